"""`kvray gallery`: static HTML pages of an output prefix, a card per row (poster, video on hover,
prompt, status, seed, error, timings, quality signals), paginated, for local and object-store outputs.
`build` reads the output and writes the pages, `pages` renders them, `command` is the CLI."""
