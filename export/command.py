"""``cxrgen export onnx|tensorrt|triton|triton-serve``: registered through the ``cxrgen.commands`` entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs / TensorRT engines / a Triton repository",
                       description="Export a checkpoint for the onnxruntime, TensorRT and Triton backends "
                                   "(`cxrgen generate --backend onnxruntime|tensorrt --model EXPORT_DIR`, "
                                   "`--backend triton --model REPO`).")
    verbs = p.add_subparsers(dest="export_command", metavar="WHAT", required=True)

    o = verbs.add_parser(
        "onnx", help="text encoder, U-Net, VAE decoder and reward models as ONNX graphs",
        description="Writes OUT/export.json (source checkpoint, graphs with input / output names, dtype, opset, "
                    "library versions), OUT/text_encoder.onnx, unet.onnx, vae_decoder.onnx (dynamic batch axes; "
                    "an aligned checkpoint's ACE tokens are inside the text encoder graph), OUT/rewards/<kind>.onnx "
                    "for every trained reward of --reward-dir, and copies of the tokenizer, the scheduler config "
                    "and the checkpoint manifest. --fp16 adds text_encoder.fp16.onnx and unet.fp16.onnx (the VAE "
                    "decoder stays fp32: fp16 decoders overflow).")
    o.add_argument("checkpoint", help="checkpoint folder (cxrgen train / align output, or a diffusers SD folder)")
    o.add_argument("out", help="export folder to write")
    o.add_argument("--fp16", action="store_true", help="also write fp16 text encoder and U-Net graphs")
    o.add_argument("--no-fuse", action="store_true",
                   help="skip unet.fused.onnx (the U-Net with attention, LayerNorm and GELU fused for onnxruntime, "
                        "1.5x faster per U-Net step on the CPU; TensorRT always builds from unet.onnx)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    o.add_argument("--reward-dir", default="", help="folder of reward folders to export (default: models/rewards)")
    o.add_argument("--no-rewards", action="store_true", help="export the generator only")
    o.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    o.set_defaults(func=run_onnx)

    t = verbs.add_parser(
        "tensorrt", help="TensorRT engines from an export folder's ONNX graphs (needs a GPU)",
        description="Builds EXPORT_DIR/tensorrt/<graph>.engine with the TensorRT Python API from the fp16 graphs "
                    "(fp32 where the export has none, and always for the VAE decoder), optimisation profiles "
                    "batch 1..--max-batch (U-Net 2..2x that for guidance), a shared timing cache "
                    "(tensorrt/timing.cache), and next to each engine <graph>.engine.json stamping the TensorRT "
                    "version, GPU name and compute capability. Engines built for another TensorRT or GPU are "
                    "refused unless --rebuild.")
    t.add_argument("export_dir", help="folder written by `cxrgen export onnx`")
    t.add_argument("--max-batch", type=int, default=16, help="largest image batch of the profiles")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit")
    t.add_argument("--rebuild", action="store_true", help="rebuild engines that exist (also mismatched ones)")
    t.set_defaults(func=run_tensorrt)

    r = verbs.add_parser(
        "triton", help="a Triton model repository from an export folder",
        description="Writes REPO/cxrgen_text_encoder, cxrgen_unet, cxrgen_vae_decoder and cxrgen_reward_<name> (one "
                    "model per graph: config.pbtxt with dynamic batching, batch 1..--max-batch, the U-Net twice "
                    "that; 1/model.onnx, and for --platform python 1/model.py running onnxruntime), "
                    "REPO/cxrgen_pipeline (python backend: the sampling loop calling those models through BLS; "
                    "1/export/ holds the manifest, tokenizer and scheduler) and REPO/cxrgen_triton.json. Serve it "
                    "with `cxrgen export triton-serve REPO` or any Triton server whose python environment has "
                    "cxrgen installed; query it with `cxrgen generate --backend triton --model REPO`.")
    r.add_argument("export_dir", help="folder written by `cxrgen export onnx`")
    r.add_argument("repo", help="model repository folder to write")
    r.add_argument("--platform", default="python", choices=["python", "onnxruntime", "tensorrt"],
                   help="python: python-backend models running onnxruntime (the bundled server has only this "
                        "backend); onnxruntime: platform onnxruntime_onnx; tensorrt: platform tensorrt_plan from "
                        "`cxrgen export tensorrt`'s engines")
    r.add_argument("--max-batch", type=int, default=16, help="largest image batch per request (U-Net: twice)")
    r.add_argument("--kind", default="cpu", choices=["cpu", "gpu"], help="instance kind of the graph models")
    r.add_argument("--instances", type=int, default=1, help="instances of every model")
    r.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="text encoder and U-Net graphs (fp16 needs `export onnx --fp16`; the VAE decoder stays fp32)")
    r.add_argument("--force", action="store_true", help="overwrite a non-empty REPO")
    r.set_defaults(func=run_triton)

    s = verbs.add_parser(
        "triton-serve", help="serve a repository with the tritonserver bundled in nvidia-pytriton",
        description="Runs the Triton server that the nvidia-pytriton wheel ships (python backend only) on REPO in "
                    "the foreground, with this interpreter's libpython and packages (see export/triton_server.py). "
                    "Binds --host (default 127.0.0.1). Ctrl-C stops it.")
    s.add_argument("repo", help="folder written by `cxrgen export triton` (--platform python)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics; 0 turns them off")
    s.set_defaults(func=run_triton_serve)


def run_onnx(args: argparse.Namespace) -> int:
    from .folder import ExportConfig
    from .onnx_export import export_onnx

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, opset=args.opset, fp16=args.fp16,
                       reward_dir=args.reward_dir, rewards=not args.no_rewards, fuse=not args.no_fuse)
    print(json.dumps({"export_config": dataclasses.asdict(cfg)}))
    out = export_onnx(cfg, force=args.force)
    doc = json.loads((out / "export.json").read_text())
    print(json.dumps({"out": str(out), "graphs": sorted(doc["graphs"]), "fp16": sorted(doc["fp16_graphs"]),
                      "fused": sorted(doc.get("fused_graphs", {})),
                      "rewards": sorted(doc["rewards"]), "max_abs_diff": doc["verified_max_abs_diff"]}))
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt import build_engines

    built = build_engines(args.export_dir, max_batch=args.max_batch, workspace_gb=args.workspace_gb,
                          rebuild=args.rebuild)
    print(json.dumps({"export_dir": args.export_dir, "engines": built}))
    return 0


def run_triton(args: argparse.Namespace) -> int:
    from .triton import write_repository

    out = write_repository(args.export_dir, args.repo, platform=args.platform, max_batch=args.max_batch,
                           kind=args.kind, instances=args.instances, precision=args.precision, force=args.force)
    doc = json.loads((out / "cxrgen_triton.json").read_text())
    print(json.dumps({"repo": str(out), "platform": doc["platform"], "models": sorted(doc["models"].values())}))
    return 0


def run_triton_serve(args: argparse.Namespace) -> int:
    from .triton_server import serve

    return serve(args.repo, args.http_port, args.grpc_port, args.metrics_port or None, args.host)
