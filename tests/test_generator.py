"""The generator's log-likelihood: duplicate permutations share one forward pass without changing any value."""

import torch

from dro_plugins.modeling.generator import LMGenerator
from dro_plugins.data.synthetic import make_dataset


def test_duplicate_permutations_give_the_values_of_separate_passes(tiny_lm, tokenizer):
    generator = LMGenerator(tiny_lm(seed=1), tokenizer, max_passage_words=10, max_new_tokens=4)
    batch = make_dataset(2, 4, seed=5)
    permutations = torch.tensor([[[0, 1], [2, 3], [0, 1], [1, 0]], [[3, 2], [3, 2], [3, 2], [0, 2]]])
    together = generator.log_likelihood(batch, permutations)
    one_by_one = torch.stack(
        [torch.cat([generator.log_likelihood([ex], permutations[b, i][None, None]) for i in range(4)], dim=1)[0] for b, ex in enumerate(batch)]
    )
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)
    assert together[0, 0] == together[0, 2] and together[0, 0] != together[0, 3]  # order matters to the generator

    # the gradient of a weighted sum counts a duplicated permutation once per copy
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    params = [p for p in generator.model.parameters() if p.requires_grad]
    grad_together = torch.autograd.grad((weights * generator.log_likelihood(batch, permutations)).sum(), params)
    merged = torch.tensor([[[0, 1], [2, 3], [1, 0]], [[3, 2], [0, 2], [0, 2]]])
    merged_weights = torch.tensor([[0.4, 0.2, 0.4], [0.75, 0.25, 0.0]])
    grad_merged = torch.autograd.grad((merged_weights * generator.log_likelihood(batch, merged)).sum(), params)
    for a, b in zip(grad_together, grad_merged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
