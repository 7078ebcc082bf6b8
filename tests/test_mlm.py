"""BERT/IRRA masking: rates, special tokens, labels, determinism and the at-least-one rule."""

import pytest
import torch

from data.mlm import IGNORE_INDEX, mask_tokens

VOCAB = 1000
PAD, EOS, BOS, MASK = 0, 1, 2, 3
SPECIALS = {PAD, EOS, BOS, MASK}


def _ids(rows: int = 400, length: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=g)
    ids[:, 0] = BOS
    ids[:, -8:] = PAD  # padded tail
    ids[:, -9] = EOS
    return ids


def _mask(ids: torch.Tensor, seed: int = 0, probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_tokens(
        ids,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=SPECIALS,
        probability=probability,
        generator=torch.Generator().manual_seed(seed),
    )


def test_selection_and_replacement_rates():
    ids = _ids()
    masked, labels = _mask(ids)
    selected = labels != IGNORE_INDEX
    candidates = ~torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    n_selected = selected.sum().item()
    assert n_selected / candidates.sum().item() == pytest.approx(0.15, abs=0.01)
    to_mask = (masked == MASK) & selected
    unchanged = (masked == ids) & selected
    replaced = selected & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n_selected == pytest.approx(0.8, abs=0.03)
    assert replaced.sum().item() / n_selected == pytest.approx(0.1, abs=0.03)
    assert unchanged.sum().item() / n_selected == pytest.approx(0.1, abs=0.03)


def test_specials_are_never_selected_and_random_tokens_are_never_special():
    ids = _ids()
    masked, labels = _mask(ids, seed=1)
    is_special = torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    assert torch.all(labels[is_special] == IGNORE_INDEX)
    assert torch.equal(masked[is_special], ids[is_special])
    replaced = (labels != IGNORE_INDEX) & (masked != MASK)
    assert not torch.isin(masked[replaced], torch.tensor(sorted(SPECIALS))).any()


def test_labels_hold_original_ids_on_selection_and_ignore_index_elsewhere():
    ids = _ids(rows=50)
    masked, labels = _mask(ids, seed=2)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert labels.dtype == ids.dtype and labels.shape == ids.shape


def test_masking_is_deterministic_given_a_generator():
    ids = _ids(rows=20)
    first, second, other = _mask(ids, seed=5), _mask(ids, seed=5), _mask(ids, seed=6)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_at_least_one_token_per_row_with_ordinary_tokens():
    ids = _ids(rows=30, length=12)
    ids[4] = PAD  # an all-special row: nothing to select
    _, labels = _mask(ids, seed=3, probability=1e-9)
    per_row = (labels != IGNORE_INDEX).sum(dim=1)
    assert per_row[4] == 0
    assert torch.all(per_row[torch.arange(30) != 4] == 1)


def test_single_sequence_input():
    ids = _ids(rows=1, length=20)[0]
    masked, labels = _mask(ids, seed=4, probability=1e-9)
    assert masked.shape == ids.shape and (labels != IGNORE_INDEX).sum() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(probability=0.0), "probability"),
        (dict(mask_token_id=VOCAB), "mask_token_id"),
        (dict(vocab_size=4, special_token_ids=SPECIALS), "special"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    arguments = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS) | kwargs
    with pytest.raises(ValueError, match=message):
        mask_tokens(_ids(rows=2), **arguments)
