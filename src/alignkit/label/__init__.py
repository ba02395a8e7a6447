"""Human preference collection: a labelling web app (FastAPI + SQLite) wired to reward-model and DPO training.

candidates (load/validate the input) -> store (SQLite) -> app (the web app) -> agreement (quality) -> export
(training data); select orders the queue; sample writes candidates from a policy. See docs/labelling.md.
"""
