"""Deployment: ONNX export and encoders (:mod:`~vireid.serve.encoder`), single-query re-ranking on
precomputed gallery structures (:mod:`~vireid.serve.rerank`), the versioned on-disk gallery index
(:mod:`~vireid.serve.index`), enrolment inputs (:mod:`~vireid.serve.sources`,
:mod:`~vireid.serve.enrol`) and the FastAPI search service with its web page (:mod:`~vireid.serve.app`).
See ``docs/serving.md``."""
