"""``cxrgen export onnx|tensorrt``: registered through the ``cxrgen.commands`` entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs / TensorRT engines",
                       description="Export a checkpoint for the onnxruntime and TensorRT backends "
                                   "(`cxrgen generate --backend onnxruntime|tensorrt --model EXPORT_DIR`).")
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


def run_onnx(args: argparse.Namespace) -> int:
    from .folder import ExportConfig
    from .onnx_export import export_onnx

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, opset=args.opset, fp16=args.fp16,
                       reward_dir=args.reward_dir, rewards=not args.no_rewards)
    print(json.dumps({"export_config": dataclasses.asdict(cfg)}))
    out = export_onnx(cfg, force=args.force)
    doc = json.loads((out / "export.json").read_text())
    print(json.dumps({"out": str(out), "graphs": sorted(doc["graphs"]), "fp16": sorted(doc["fp16_graphs"]),
                      "rewards": sorted(doc["rewards"]), "max_abs_diff": doc["verified_max_abs_diff"]}))
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt import build_engines

    built = build_engines(args.export_dir, max_batch=args.max_batch, workspace_gb=args.workspace_gb,
                          rebuild=args.rebuild)
    print(json.dumps({"export_dir": args.export_dir, "engines": built}))
    return 0
