"""Knowledge metrics: torchmetrics classes (`modular`) over functional forms (`functional`).

`from lora_lightning.metrics import Reliability` for accumulating across batches and ranks;
`from lora_lightning.metrics.functional import reliability` for one list of answers.
"""

from lora_lightning.facts import CATEGORIES
from lora_lightning.metrics.functional import (
    DEFAULT_REFUSAL_PATTERNS,
    NEGATIVE_SHIFTS,
    POSITIVE_SHIFTS,
    decode_answers,
    encode_answers,
)
from lora_lightning.metrics.modular import (
    AliasAccuracy,
    AnswerAgreement,
    AnswerConcentration,
    Confidence,
    ExactMatch,
    KnowledgeShift,
    RefusalRate,
    Reliability,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_REFUSAL_PATTERNS",
    "NEGATIVE_SHIFTS",
    "POSITIVE_SHIFTS",
    "AliasAccuracy",
    "AnswerAgreement",
    "AnswerConcentration",
    "Confidence",
    "ExactMatch",
    "KnowledgeShift",
    "RefusalRate",
    "Reliability",
    "decode_answers",
    "encode_answers",
]
