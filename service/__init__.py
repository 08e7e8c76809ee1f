"""cxrgen's model-serving microservice (issue 9): a BentoML service in ``service.service``.

Nothing here is imported by ``training`` or ``export``; heavy imports are deferred so the service
module loads fast (DESIGN.md).
"""
