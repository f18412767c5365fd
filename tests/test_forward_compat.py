"""Forward compatibility: sdlora calls the non-deprecated names of the libraries it runs on (issue 25, section 5)."""

import warnings

from sdlora.training.loop import train


def test_a_run_with_gradient_checkpointing_emits_no_deprecation_warning(make_config):
    """transformers 5 renamed gradient_checkpointing_enable / is_gradient_checkpointing to activation_checkpointing_*
    (the old names warn, and go in v6); sdlora uses the new names where they exist."""
    cfg = make_config(train={"max_steps": 1, "gradient_checkpointing": True}, text_encoder={"train": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, log=lambda *a, **k: None)
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not deprecated, deprecated
