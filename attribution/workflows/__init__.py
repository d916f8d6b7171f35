"""End-to-end workflows built on the run directory: the copyright experiment, curation, the demo and the
notebook API. They read runs only through `attribution.values` and start training through
`attribution.train`; their command-line wrappers live in `attribution.workflows.cli` and the areas' cli modules."""
