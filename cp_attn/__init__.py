"""cp-attn: context-parallel prefill for DeepSeek V3.2 sparse-attention (DSA/NSA) models."""

from cp_attn.layout import SplitPlan, plan_split

__all__ = ["SplitPlan", "plan_split", "reference_logits"]


def __getattr__(name):
    # Lazy so that `import cp_attn` stays cheap and the layout stays importable on its own.
    if name == "reference_logits":
        from cp_attn.reference import reference_logits

        return reference_logits
    raise AttributeError(name)
