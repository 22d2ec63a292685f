"""Make and inspect packed image sets (raw uint8 pixels, memory-mapped at training time).

  pixelrepa data pack SRC DST --size 256 --workers 8     an ImageNet-layout folder, a `datasets` folder
                                                        or parquet files, WebDataset .tar shards, an
                                                        EDM2 / REPA zip (pixelrepa.data.sources)
  pixelrepa data prepare mnist DST --size 32             MNIST / Fashion-MNIST from the IDX files
  pixelrepa data info DST [--verify]                     manifest summary and checks

Packing is resumable: an interrupted `pack` or `prepare` continues where it stopped when run
again with the same arguments. A finished pack is replaced only with --overwrite, and only once
the new one is finished: it is written in DST.partial, then swapped in (pixelrepa.data.packed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelrepa.data.idx import load_idx_dataset
from pixelrepa.data.packed import PackedDataset, pack_arrays
from pixelrepa.data.sources import pack_source

SHOWN_SKIPPED = 10


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    pack = actions.add_parser("pack", help="pack labelled images (ADM center crop): an image folder, a `datasets` "
                              "folder or parquet files, WebDataset shards, an EDM2 zip")
    pack.add_argument("src", help="folder with one sub-folder of images per class, a `datasets` save_to_disk "
                      "folder, .parquet file(s), .tar shard(s) (a folder, a file or a glob), or an EDM2 / REPA "
                      ".zip or folder with dataset.json")
    pack.add_argument("dst", type=Path, help="pack folder to write")
    pack.add_argument("--size", type=int, required=True, help="side of the square images in pixels")
    pack.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    pack.add_argument("--overwrite", action="store_true",
                      help="replace an existing pack once the new one is finished (written in DST.partial)")
    pack.add_argument("--allow-empty-classes", action="store_true",
                      help="keep classes without an image (class folders without a readable image, class names "
                      "or label numbers no item has) as empty classes")
    pack.add_argument("--image-column", help="`datasets` / parquet: the image column (default: detected)")
    pack.add_argument("--label-column", help="`datasets` / parquet: the label column (default: detected)")

    prepare = actions.add_parser("prepare", help="pack MNIST or Fashion-MNIST from the installed IDX files")
    prepare.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    prepare.add_argument("dst", type=Path, help="pack folder to write")
    prepare.add_argument("--size", type=int, default=32, help="image side (28 is padded or resized; default 32)")
    prepare.add_argument("--split", choices=["train", "test"], default="train")
    prepare.add_argument("--data-dir", type=Path, help="folder with the IDX .gz files (default: installed)")
    prepare.add_argument("--limit", type=int, help="pack only the first N images")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an existing pack once the new one is finished (written in DST.partial)")

    info = actions.add_parser("info", help="print a pack's manifest summary and check it")
    info.add_argument("dst", type=Path, help="pack folder")
    info.add_argument("--verify", action="store_true", help="also recompute the SHA-256 of the data files")


def run(args: argparse.Namespace) -> int:
    if args.action == "pack":
        if args.size <= 0 or args.workers <= 0:
            raise ValueError("--size and --workers must be positive")
        report(pack_source(args.src, args.dst, args.size, workers=args.workers, overwrite=args.overwrite,
                           image_column=args.image_column, label_column=args.label_column,
                           allow_empty_classes=args.allow_empty_classes), args.dst)
    elif args.action == "prepare":
        images, labels, classes = load_idx_dataset(args.dataset, args.split, args.size, args.data_dir)
        if args.limit is not None:
            if args.limit <= 0:
                raise ValueError("--limit must be positive")
            images, labels = images[:args.limit], labels[:args.limit]
        source = f"{args.dataset} {args.split}" + (f" (first {len(labels)})" if args.limit is not None else "")
        report(pack_arrays(images, labels, args.dst, classes, source, overwrite=args.overwrite), args.dst)
    else:
        dataset = PackedDataset(args.dst, verify_checksum=args.verify)
        report(dataset.manifest, args.dst)
        print("checks        manifest and file sizes ok"
              + (", SHA-256 ok" if args.verify else " (--verify also checks SHA-256)"))
    return 0


def report(manifest: dict, path: Path) -> None:
    classes = manifest["class_names"]
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    print(f"pack          {path} ({manifest['format']})")
    print(f"images        {manifest['count']} x {manifest['size']}x{manifest['size']}x{manifest['channels']} uint8")
    print(f"classes       {len(classes)}: {shown}")
    print(f"source        {manifest['source']}")
    print(f"created       {manifest['created']['time']}, pixelrepa {manifest['created']['pixelrepa']}")
    skipped = manifest["skipped"]
    print(f"skipped       {len(skipped)}")
    for item in skipped[:SHOWN_SKIPPED]:
        print(f"  {item}")
    if len(skipped) > SHOWN_SKIPPED:
        print(f"  ... {len(skipped) - SHOWN_SKIPPED} more in {path / 'manifest.json'}")
