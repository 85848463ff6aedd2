"""The generation loop shared by every runnable LM (`rqcompile.runtime.generate`), on a scripted program."""

from __future__ import annotations

import torch

from rqcompile.runtime import generate as gen

VOCAB, EOS, OTHER_EOS = 10, 9, 8


class Scripted:
    """A StepProgram whose greedy token at step j of row r is script[r][j] (then 0); counts its decode calls."""

    batch_size, max_cache_len = 2, 64

    def __init__(self, script: list[list[int]]):
        self.script, self.calls = script, 0

    def _logits(self, step: int) -> torch.Tensor:
        rows = [s[step] if step < len(s) else 0 for s in self.script]
        return torch.nn.functional.one_hot(torch.tensor(rows), VOCAB).float()[:, None, :]

    def prefill(self, input_ids, cache_position):
        return self._logits(0)

    def decode(self, input_ids, cache_position):
        self.calls += 1
        return self._logits(int(cache_position[0]) - 3 + 1)  # prompts are 3 tokens long


def _per_step_reference(script, max_new, stops):
    """What the loop returned when it checked "every row finished" after each step."""
    out, finished = [], [False] * len(script)
    for step in range(max_new):
        row = []
        for r, s in enumerate(script):
            token = s[step] if step < len(s) else 0
            token = min(stops) if finished[r] else token
            finished[r] = finished[r] or token in stops
            row.append(token)
        out.append(row)
        if all(finished):
            break
    return torch.tensor(out).T


def test_stopping_is_checked_in_batches_but_the_output_ends_where_every_row_finished():
    script = [[1, 2, EOS, 5, 6], [3, 4, 5, 6, OTHER_EOS, 7]]  # row 0 stops at step 2, row 1 at step 4
    prompt = torch.zeros(2, 3, dtype=torch.long)
    program = Scripted(script)
    got = gen.generate(program, prompt, 20, eos_token_id=[EOS, OTHER_EOS])
    expected = _per_step_reference(script, 20, {EOS, OTHER_EOS})
    assert torch.equal(got[:, 3:], expected)  # [[1, 2, 9, 8, 8], [3, 4, 5, 6, 8]]: rows pad with a stop token
    assert program.calls == gen.STOP_CHECK_EVERY - 1  # ran on to the first check, not to max_new_tokens


def test_a_streamer_sees_each_token_once_and_nothing_past_the_stop():
    script = [[1, EOS], [2, 3, EOS]]
    seen = []
    got = gen.generate(
        Scripted(script), torch.zeros(2, 3, dtype=torch.long), 20, eos_token_id=EOS, streamer=seen.append
    )
    assert torch.equal(torch.stack(seen, 1), got[:, 3:]) and got.shape[1] == 3 + 3


def test_without_stop_tokens_it_runs_max_new_tokens():
    got = gen.generate(Scripted([[EOS] * 4, [1] * 4]), torch.zeros(2, 3, dtype=torch.long), 6, eos_token_id=[])
    assert got.shape == (2, 3 + 6)
