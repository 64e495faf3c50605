"""A user's own job package, as docs/jobs.md describes it (`FORKLIFT_JOB_MODULES=myjobs.stats`)."""
