"""kd_core.py serves a real language-model trainer (issue 24, item 5).

kd_core.py alone is copied into an empty folder; a fresh process builds two small randomly
initialised GPT-2 models with transformers, pads a token batch with -100 the Hugging Face way
(labels shifted by one inside the loss), and distils for a few steps with ``distill_linear``, PESF's
two-way weights moving an adapter on the teacher's hidden states. A twin run computes the same
loss from materialised float64 logits with formulas written in the script; losses, the student and
the adapter must agree step by step.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")

SCRIPT = textwrap.dedent("""
    import copy
    import sys

    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    import kd_core

    assert kd_core.__file__.startswith(sys.argv[1]), kd_core.__file__
    torch.manual_seed(0)
    VOCAB, TAU, W = 32000, 2.0, {"kl_ts": 0.9, "ce_s": 0.1, "kl_st": 0.9, "ce_t": 0.5}
    # No dropout: both runs must see the same function.
    size = dict(vocab_size=VOCAB, n_positions=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    student = GPT2LMHeadModel(GPT2Config(n_embd=64, **size)).double()
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=96, **size)).double()
    teacher.requires_grad_(False)
    teacher_before = copy.deepcopy(teacher.state_dict())
    adapter = kd_core.Adapter(96, bottleneck=8).double()
    torch.nn.init.normal_(adapter.up.weight, std=0.02)     # not the identity, so that its gradient is informative

    # A right-padded batch as a tokenizer's collator gives it; labels = input_ids with -100 on padding.
    input_ids = torch.randint(0, VOCAB, (3, 12))
    attention = torch.ones_like(input_ids)
    attention[0, 8:] = 0
    attention[2, 5:] = 0
    labels = input_ids.masked_fill(attention == 0, -100)
    shifted = labels[:, 1:]                                  # position i predicts token i + 1

    def reference_loss(h_s, w_s, h_t, w_t):
        # float64, materialised [B, S-1, V] logits; PESF-KD's two-way loss with label adjustment.
        s, t, y = (h_s @ w_s.T).reshape(-1, VOCAB), (h_t @ w_t.T).reshape(-1, VOCAB), shifted.reshape(-1)
        keep = y != -100
        s, t, y = s[keep], t[keep], y[keep]
        rows = torch.arange(len(y))

        def adjusted(z):
            top = z.argmax(1)
            out = z.clone()
            out[rows, top], out[rows, y] = z[rows, y], z[rows, top]
            return out

        def kl(target, learner):
            log_q, log_p = F.log_softmax(target / TAU, 1), F.log_softmax(learner / TAU, 1)
            return TAU ** 2 * (log_q.exp() * (log_q - log_p)).sum(1).mean()

        return (W["kl_ts"] * kl(adjusted(t).detach(), s) + W["ce_s"] * F.cross_entropy(s, y)
                + W["kl_st"] * kl(adjusted(s).detach(), t) + W["ce_t"] * F.cross_entropy(t, y))

    def hidden(model, adapt=None):
        h = model.transformer(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
        return adapt(h) if adapt is not None else h

    runs = {}
    for name in ("distill_linear", "materialised"):
        s_model, a_model = copy.deepcopy(student), copy.deepcopy(adapter)
        opt = torch.optim.SGD([*s_model.parameters(), *a_model.parameters()], lr=0.5)
        losses = []
        for step in range(3):
            h_s, h_t = hidden(s_model), hidden(teacher, a_model)
            if name == "distill_linear":
                loss = kd_core.distill_linear(h_s, s_model.lm_head.weight, h_t, teacher.lm_head.weight, shifted,
                                              tau=TAU, weights=W, adjust=True, chunk_size=7)
            else:
                loss = reference_loss(h_s, s_model.lm_head.weight, h_t, teacher.lm_head.weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = (losses, s_model, a_model)

    (got, s1, a1), (want, s2, a2) = runs["distill_linear"], runs["materialised"]
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-10 * abs(b), (step, a, b)
    for (name, p), q in zip([*s1.named_parameters(), *a1.named_parameters()], [*s2.parameters(), *a2.parameters()]):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name
    moved = max(float((p - q).abs().max()) for p, q in zip(a1.parameters(), adapter.parameters()))
    assert moved > 1e-4, moved                               # the teacher-side adapter learned
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())   # backbone frozen
    print("ok", got)
""")


def test_gpt2_distillation_with_kd_core_copied_alone(tmp_path: Path) -> None:
    shutil.copy(ROOT / "kd_core.py", tmp_path / "kd_core.py")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout
