"""Authorization: topic patterns and declarative, deny-by-default TOML policies."""

from securebroker.authz.patterns import (
    MAX_PATTERN_LENGTH,
    PatternError,
    PatternSet,
    PolicyError,
    TopicPattern,
    compile_pattern,
    is_valid_topic,
)
from securebroker.authz.policy import (
    POLICY_VERSION,
    Decision,
    Effect,
    Policy,
    PolicyStore,
    Rule,
    RuleMatch,
    load_policy,
)

__all__ = [
    "MAX_PATTERN_LENGTH",
    "POLICY_VERSION",
    "Decision",
    "Effect",
    "PatternError",
    "PatternSet",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Rule",
    "RuleMatch",
    "TopicPattern",
    "compile_pattern",
    "is_valid_topic",
    "load_policy",
]
