"""Deployment: ONNX export and encoders (:mod:`~vireid.serve.encoder`), the versioned on-disk gallery
index with O(items added) enrolment (:mod:`~vireid.serve.index`; single-query re-ranking lives in
:mod:`vireid.retrieval.single` and :mod:`vireid.retrieval.gallery_state`), enrolment inputs (:mod:`~vireid.serve.sources`,
:mod:`~vireid.serve.enrol`) and the FastAPI search service with its web page (:mod:`~vireid.serve.app`).
See ``docs/serving.md``."""
