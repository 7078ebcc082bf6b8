"""Person search over a photo folder with a trained model.

    uv run search.py index PHOTOS --model RUN/checkpoints/best.ckpt --index photos_index   # or an exported folder
    uv run search.py query --index photos_index "người đàn ông mặc áo khoác đen" -k 5 --grid top5.png --json out.json
    uv run search.py query --index photos_index --file queries.txt
    uv run search.py web --index photos_index            # http://127.0.0.1:8765

`index` encodes every jpg/png/webp under the folder (batched, on the GPU when present) and, run again, encodes only
new or changed files. `query` and `web` use the model recorded in the index unless --model names the same weights.
Search runs on the backend the index was built with (--backend at indexing; auto: exact faiss-flat up to 50,000
images, approximate faiss-ivf above). --follow-links also indexes links that lead outside the folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from search_app.backends import AUTO, BACKENDS, EXACT_UP_TO
from search_app.grid import results_grid
from search_app.index import build_index
from search_app.query import format_results, open_search, read_queries, search
from search_app.web import make_server
from utils.io import atomic_write_json

log = logging.getLogger("search")


def _model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index folder")
    parser.add_argument(
        "--model",
        type=Path,
        required=required,
        help="trained .ckpt or exported folder" + ("" if required else " (default: the index's)"),
    )
    parser.add_argument(
        "--text-attention-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mask text pads (default: what the checkpoint or exported folder recorded from training)",
    )
    parser.add_argument(
        "--backend",
        choices=(AUTO, *BACKENDS),
        default=AUTO,
        help=f"search engine; auto: the index's, or for a new index faiss-flat (exact) up to {EXACT_UP_TO:,} images "
        "and faiss-ivf (approximate) above. Another backend than the index's is refused",
    )


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", type=Path, help="folder of images, searched recursively")
    _model_arguments(parser, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    parser.add_argument("--skip-unreadable", action="store_true", help="leave undecodable images out")
    parser.add_argument(
        "--follow-links",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also index (and serve) images that links lead to outside the folder (default: the index's, else no)",
    )


def _run_index(args: argparse.Namespace) -> None:
    report = build_index(
        args.images,
        args.model,
        args.index,
        batch_size=args.batch_size,
        workers=args.workers,
        text_attention_mask=args.text_attention_mask,
        skip_unreadable=args.skip_unreadable,
        backend=args.backend,
        follow_links=args.follow_links,
    )
    print(
        f"{report.total} images indexed ({report.encoded} encoded, {report.reused} unchanged, "
        f"{report.removed} removed, {len(report.skipped)} unreadable skipped) in {args.index} "
        f"(backend {report.backend})"
    )


def _query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sentences", nargs="*", help="descriptions, Vietnamese or English")
    _model_arguments(parser, required=False)
    parser.add_argument("--file", type=Path, help="more queries, one per line")
    parser.add_argument("-k", type=int, default=10, help="images per query")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here ('-': stdout only)")
    parser.add_argument("--grid", type=Path, help="write a PNG: each query above its top-k thumbnails")
    parser.add_argument("--thumb", type=int, nargs=2, default=(128, 64), metavar=("H", "W"), help="thumbnail size")


def _run_query(args: argparse.Namespace) -> None:
    queries = read_queries(args.sentences, args.file)
    index, encoder = open_search(
        args.index, args.model, text_attention_mask=args.text_attention_mask, backend=args.backend
    )
    results = search(index, encoder, queries, args.k)
    payload = [{"query": r.query, "hits": [vars(h) for h in r.hits]} for r in results]
    if args.json == Path("-"):
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        print(format_results(results))
        if args.json:
            atomic_write_json(args.json, payload)
    if args.grid:
        results_grid(results, index.root, args.grid, thumb_size=tuple(args.thumb))
        log.info("Wrote %s", args.grid)


def _web_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser, required=False)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8765)


def _run_web(args: argparse.Namespace) -> None:
    server = make_server(
        *open_search(args.index, args.model, text_attention_mask=args.text_attention_mask, backend=args.backend),
        host=args.host,
        port=args.port,
    )
    host, port = server.server_address[:2]
    print(f"Serving {len(server.served)} images on http://{host}:{port}/ (Ctrl-C stops)")
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]] = {
    "index": (_index_arguments, _run_index, "encode a folder of images (incrementally)"),
    "query": (_query_arguments, _run_query, "top-k images for sentences"),
    "web": (_web_arguments, _run_web, "serve a local search page"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        add_arguments(verbs.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        COMMANDS[args.command][1](args)
    except (ValueError, OSError) as err:  # our errors name the file and the fix; a traceback adds nothing
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
