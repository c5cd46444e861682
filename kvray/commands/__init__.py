"""The commands of `kvray`, one module each: `add_parser(subparsers)` registers the command's parser, with
its handler as the parser's `run` default. The commands parse, print and pick exit codes; the work is done
by the packages they call (the renderer in kvray.distributed, the pipeline, the benchmarks, ...)."""
