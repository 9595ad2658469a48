"""Demo data for the examples, tests and benchmarks, not integrations: the bundled
SmolLM2-135M model or a local checkpoint (`models`), and King James Bible pass-key
haystacks (`haystack`). Each module imports its optional packages lazily."""
