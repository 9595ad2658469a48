"""Building blocks of long-document inference jobs: a content-keyed store of prefilled
document caches reused across runs (`store`, `keys`, `collective`), and the `--jobs
FILE.jsonl` format with a resumable runner (`jobsfile`)."""
