"""The `vlmprune` command line: one module per subcommand, with `add_parser(subparsers)` and `run(args)`."""
