"""Evaluation: chunked CMC / mAP / mINP under the community protocols, trials, reports."""

from vireid.evaluation.evaluator import (
    DistanceFn,
    ProtocolEvaluation,
    evaluate_features,
    evaluate_precomputed,
    evaluate_ranked_lists,
    plain_distance,
)
from vireid.evaluation.metrics import (
    PROTOCOLS,
    EvalResult,
    Protocol,
    QueryScores,
    evaluate_distance,
    evaluate_ranked,
    get_protocol,
    mean_result,
    score_distance,
    score_ranked,
)

__all__ = [
    "PROTOCOLS", "DistanceFn", "EvalResult", "Protocol", "ProtocolEvaluation", "QueryScores",
    "evaluate_distance", "evaluate_features", "evaluate_precomputed", "evaluate_ranked",
    "evaluate_ranked_lists", "get_protocol", "mean_result", "plain_distance", "score_distance", "score_ranked",
]
