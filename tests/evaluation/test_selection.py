"""The best-checkpoint rule and the overfitting warning, on hand-made curves."""
from finetune.evaluation.selection import choose_checkpoint

BASE = {"checkpoint": "base", "step": 0, "dino": 0.40, "clip_t": 0.30}


def rows(*values):
    return [{"checkpoint": f"step-{step:06d}", "step": step, "dino": dino, "clip_t": clip_t}
            for step, dino, clip_t in values]


def test_highest_dino_whose_clip_t_stays_within_the_drop_and_overfitting_after_it():
    curve = rows((100, 0.50, 0.31), (200, 0.60, 0.285), (300, 0.66, 0.27), (400, 0.70, 0.25))
    verdict = choose_checkpoint(BASE, curve, max_clip_t_drop=0.02)  # floor 0.28
    assert verdict.best == "step-000200"
    assert verdict.rule == "highest DINO among checkpoints with CLIP-T >= 0.2800 (base 0.3000 - 0.02)"
    assert verdict.warnings == ["overfitting from step-000300: DINO rose to 0.6600 (best step-000200: 0.6000) while "
                                "CLIP-T fell to 0.2700, below 0.2800; later checkpoints trade prompt fidelity for "
                                "likeness"]
    # a looser limit keeps every checkpoint: the last is best, and nothing after it to warn about
    assert choose_checkpoint(BASE, curve, max_clip_t_drop=0.1).best == "step-000400"
    assert choose_checkpoint(BASE, curve, max_clip_t_drop=0.1).warnings == []


def test_no_warning_when_later_checkpoints_lose_likeness_too():
    curve = rows((100, 0.55, 0.30), (200, 0.50, 0.20))
    verdict = choose_checkpoint(BASE, curve, max_clip_t_drop=0.02)
    assert (verdict.best, verdict.warnings) == ("step-000100", [])


def test_when_none_keeps_clip_t_the_best_prompt_fidelity_wins_with_a_warning():
    curve = rows((100, 0.70, 0.20), (200, 0.75, 0.22), (300, 0.80, 0.21))
    verdict = choose_checkpoint(BASE, curve, max_clip_t_drop=0.02)
    assert verdict.best == "step-000200"
    assert verdict.rule.startswith("highest CLIP-T: no checkpoint kept CLIP-T >= 0.2800")
    assert len(verdict.warnings) == 1 and "more than 0.02 below the base model's 0.3000" in verdict.warnings[0]


def test_ties_go_to_the_earlier_checkpoint():
    curve = rows((100, 0.60, 0.30), (200, 0.60, 0.30))
    assert choose_checkpoint(BASE, curve, 0.02).best == "step-000100"
