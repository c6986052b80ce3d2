"""The metric functions on fixed embeddings, against values worked out by hand."""
import math

import pytest
import torch

from finetune.evaluation.metrics import mean_paired_cosine, mean_pairwise_cosine

R = 1 / math.sqrt(2)


def test_pairwise_mean_averages_every_generated_real_pair():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    # cosines: row (1,0): 1, R, 0; row (0,1): 0, R, -1  -> mean of six
    assert mean_pairwise_cosine(generated, real) == pytest.approx((1 + R + 0 + 0 + R - 1) / 6, abs=1e-12)
    # lengths do not matter, only directions
    assert mean_pairwise_cosine(3 * generated, 0.5 * real) == pytest.approx((2 * R) / 6, abs=1e-12)


def test_paired_mean_matches_row_i_with_row_i():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    assert mean_paired_cosine(a, b) == pytest.approx((1 + R - 1) / 3, abs=1e-12)
    with pytest.raises(ValueError):
        mean_paired_cosine(a, b[:2])


def test_identical_embeddings_give_one_and_opposite_minus_one():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    assert mean_paired_cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert mean_paired_cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert mean_pairwise_cosine(x[:1], x[:1]) == pytest.approx(1.0, abs=1e-12)
    # fp16 input (embedders on a GPU) is scored in float64
    assert mean_pairwise_cosine(x.half()[:1], x.half()[:1]) == pytest.approx(1.0, abs=1e-12)
