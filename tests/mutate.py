"""Mutation testing by hand-chosen semantic mutants (not run in CI: it is slow).

    OMP_NUM_THREADS=1 python tests/mutate.py              # every mutant; prints caught / total
    python tests/mutate.py --list                          # names, files and what each mutant breaks
    python tests/mutate.py --only pesf-no-detach,kd-ce-weight --verbose
    python tests/mutate.py --baseline                      # each mutant's tests pass on the untouched code

Each mutant is one textual patch (``old`` must occur exactly once in its file; a mutant whose ``old``
no longer matches is reported as stale, so a later change to the code shows up here) followed by a
targeted subset of the tests, so that one mutant costs seconds. The patch is applied in a scratch copy
of the repository, never in the working tree. A mutant is caught when its tests fail (or time out).
Selectors naming a test file that does not exist yet are dropped (the score before a test file existed).
Add a mutant for every new method: a wrong weight, a missing detach, a wrong target.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    note: str


# Test selectors, grouped by what they exercise.
SEM = "tests/test_method_semantics.py"
LOOP = "tests/test_training_guarantees.py"
KD_CORE = "tests/test_kd_core.py"
FEAT = "tests/test_feature_methods.py"
OBJECTIVES = "tests/test_feature_objectives.py"
ENGINE = "tests/test_engine.py"
MODELS = "tests/test_models.py"
CIFAR = "tests/test_train_cifar.py"
GLUE = "tests/test_train_glue.py"
FIDELITY = "tests/test_fidelity.py"
TEACHER_MOVES = [f"{CIFAR}::test_which_teacher_tensors_change", f"{CIFAR}::test_pesf_counts_only_adapter_parameters"]
CIFAR_RUNS = [*TEACHER_MOVES, f"{CIFAR}::test_resume_is_bit_identical"]
CIFAR_DATA = [f"{CIFAR}::test_augmentation_is_a_padded_crop_with_optional_flip",
              f"{CIFAR}::test_epoch_permutation_is_sharded_without_overlap", f"{CIFAR}::test_resume_is_bit_identical",
              f"{LOOP}::test_augmentation_flips_and_crops", f"{LOOP}::test_resume_with_dropout_is_bit_identical"]
DIST_EVAL = [f"{KD_CORE}::test_consistency_meter_all_reduce_gloo", ENGINE,
             f"{CIFAR}::test_ddp_two_processes_match_one", f"{LOOP}::test_distributed_evaluation_equals_single_process"]
RESUME = [f"{CIFAR}::test_resume_is_bit_identical", f"{FEAT}::test_crd_bank_survives_resume",
          f"{LOOP}::test_resume_with_dropout_is_bit_identical", f"{LOOP}::test_resume_with_crd_bank_is_bit_identical"]
RUN_FOLDER = "tests/test_run_folder.py"
METRICS = [KD_CORE, ENGINE, f"{LOOP}::test_consistency_metrics_where_agreement_is_not_accuracy"]
STAGED = [f"tests/test_staged.py::{t}" for t in (
    "test_sftn_teacher_loss_and_gradients_match_float64", "test_sftn_distiller_weights_its_branches_as_the_paper",
    "test_rco_equal_interval_schedule",
    "test_rco_learns_from_each_anchor_then_the_converged_teacher",
    "test_sftn_stage_trains_teacher_bridges_and_the_grafted_student_blocks_only",
    "test_bert_branches_start_as_the_student_layers_on_the_teachers_hidden_states",
    "test_crash_in_the_second_stage_resumes_there")]
MULTIRUN = ["tests/test_multirun.py"]
NLP = [f"{GLUE}::test_pkd_matches_an_independent_float64_formula",
       f"{GLUE}::test_tinybert_matches_an_independent_float64_formula",
       f"{GLUE}::test_tinybert_stage_moves_the_student_towards_the_frozen_teacher", SEM]

MUTANTS = [
    # kd_core.py: the shared math
    Mutant("kl-tau-once", "kd_core.py", "* (tau * tau)", "* tau", [KD_CORE, SEM],
           "KL scaled by tau instead of tau^2"),
    Mutant("label-adjust-half-swap", "kd_core.py", "return logits.scatter(1, top, at_label).scatter(1, target, at_top)",
           "return logits.scatter(1, target, at_top)", [KD_CORE, SEM], "label adjustment copies instead of swapping"),
    Mutant("terms-ignore-detach", "kd_core.py", "kl_ts = _divergence_rows(t_target.detach() if detach_targets else",
           "kl_ts = _divergence_rows(t_target.detach() if False else", [KD_CORE, SEM],
           "torch path ignores detach_targets (kl_ts)"),
    Mutant("terms-mean-over-all-rows", "kd_core.py", "count = valid.sum().clamp(min=1)",
           "count = torch.tensor(float(len(labels)))", [KD_CORE, SEM], "ignored rows counted in the mean"),
    Mutant("meter-kl-direction", "kd_core.py", 'torch.stack([kl_div(s, t, 1.0, reduction="sum")',
           'torch.stack([kl_div(t, s, 1.0, reduction="sum")', METRICS,
           "consistency KL(s || t) instead of KL(t || s)"),
    Mutant("meter-pl-swapped", "kd_core.py", "_loyalty_rows(s, t).double().sum()",
           "_loyalty_rows(t, s).double().sum()", METRICS,
           "probability loyalty with its arguments swapped (expected equivalent: the JSD is symmetric)"),
    Mutant("meter-no-all-reduce", "kd_core.py", "        dist.all_reduce(packed)\n", "", DIST_EVAL,
           "consistency scalars not all-reduced across ranks"),
    Mutant("adapter-no-relu", "kd_core.py", "return _residual_sum(h, self.up(F.relu(self.down(h))))",
           "return _residual_sum(h, self.up(self.down(h)))", [KD_CORE, MODELS, SEM], "Houlsby adapter without its nonlinearity"),
    Mutant("lora-scaling", "kd_core.py", "self.scaling = (alpha if alpha is not None else rank) / rank",
           "self.scaling = float(alpha if alpha is not None else rank)", [KD_CORE, MODELS, SEM],
           "LoRA scaled by alpha instead of alpha / r"),
    # distillers/logit.py and base.py: what each method computes
    Mutant("kd-ce-weight", "distillers/base.py",
           "return 1 - self.cfg.alpha if self.cfg.w_ce is None else self.cfg.w_ce",
           "return self.cfg.alpha if self.cfg.w_ce is None else self.cfg.w_ce",
           [SEM, *CIFAR_RUNS], "KD's CE weighted by alpha instead of 1 - alpha"),
    Mutant("w-ce-ignored", "distillers/base.py",
           "return 1 - self.cfg.alpha if self.cfg.w_ce is None else self.cfg.w_ce", "return 1 - self.cfg.alpha",
           [FIDELITY], "w_ce (the authors' gamma) has no effect"),
    Mutant("kd-label-adjust-on", "distillers/logit.py",
           "terms = kd_core.distill_terms(s, t, y, self.cfg.tau, adjust=self.use_label_adjust(False),\n"
           "                                      detach_targets=True, backend=self.cfg.backend)\n"
           '        losses = {"kl": self.cfg.alpha * terms.kl_ts, "ce": self.ce_weight() * terms.ce_s}',
           "terms = kd_core.distill_terms(s, t, y, self.cfg.tau, adjust=self.use_label_adjust(True),\n"
           "                                      detach_targets=True, backend=self.cfg.backend)\n"
           '        losses = {"kl": self.cfg.alpha * terms.kl_ts, "ce": self.ce_weight() * terms.ce_s}',
           [SEM, *CIFAR_RUNS], "plain KD with label adjustment by default"),
    Mutant("ftkd-detached", "distillers/logit.py", "adjust=adjust, detach_targets=official,",
           "adjust=adjust, detach_targets=True,", [SEM, *TEACHER_MOVES, FIDELITY],
           "FT-KD's KL sends no gradient into the teacher"),
    Mutant("ftkd-official-not-detached", "distillers/logit.py", "adjust=adjust, detach_targets=official,",
           "adjust=adjust, detach_targets=False,", [FIDELITY],
           "ftkd_official's student KL still trains the teacher (the authors' target goes through numpy)"),
    Mutant("ftkd-official-kl-direction", "distillers/logit.py",
           "kd_core.kl_div(student_target, t, self.cfg.tau)", "kd_core.kl_div(t, student_target, self.cfg.tau)",
           [FIDELITY], "ftkd_official's teacher KL with target and learner swapped"),
    Mutant("ftkd-official-unadjusted", "distillers/logit.py",
           "student_target = (kd_core.label_adjust(s, y) if adjust else s).detach()",
           "student_target = s.detach()", [FIDELITY], "ftkd_official's teacher learns from the unadjusted student"),
    Mutant("ftkd-teacher-ce-weight", "distillers/logit.py",
           '"teacher_ce": self.cfg.w_tce * terms.ce_t}\n        if official:',
           '"teacher_ce": terms.ce_t}\n        if official:',
           [SEM, *TEACHER_MOVES], "FT-KD's teacher CE unweighted"),
    Mutant("pesf-no-detach", "distillers/logit.py",
           "adjust=adjust,\n                                      detach_targets=True, backend=self.cfg.backend)\n"
           "        teacher_terms",
           "adjust=adjust,\n                                      detach_targets=False, backend=self.cfg.backend)\n"
           "        teacher_terms",
           [SEM, *CIFAR_RUNS], "PESF-KD's KL targets not detached (the issue's first example)"),
    Mutant("pesf-teacher-ce-weight", "distillers/logit.py", '"teacher_ce": self.cfg.w_tce * teacher_terms.ce_t}',
           '"teacher_ce": (1 - self.cfg.alpha) * teacher_terms.ce_t}', [SEM, *CIFAR_RUNS],
           "PESF-KD's teacher CE weighted by 1 - alpha (the issue's second example)"),
    Mutant("pesf-w-tkl-ignored", "distillers/logit.py", '"teacher_kl": self.teacher_kl_weight() * teacher_kl',
           '"teacher_kl": self.cfg.alpha * teacher_kl', [SEM, *CIFAR_RUNS], "PESF-KD ignores w_tkl"),
    Mutant("glue-teacher-params-ignored", "distillers/base.py",
           "                    self.teacher.requires_grad_(True)\n", "                    pass\n", [FIDELITY],
           "teacher_params: all still freezes the teacher's backbone"),
    Mutant("pesf-no-label-adjust", "distillers/logit.py", "adjust, tau = self.use_label_adjust(True), self.cfg.tau",
           "adjust, tau = self.use_label_adjust(False), self.cfg.tau",
           [SEM, *CIFAR_RUNS], "PESF-KD without label adjustment by default"),
    Mutant("dml-temperature", "distillers/logit.py", "terms = kd_core.distill_terms(s, t, y, 1.0,",
           "terms = kd_core.distill_terms(s, t, y, self.cfg.tau,", [SEM, *TEACHER_MOVES], "DML at the KD temperature"),
    Mutant("dml-no-teacher-kl", "distillers/logit.py", ''', "teacher_kl": terms.kl_st}''', "}",
           [SEM, *TEACHER_MOVES], "DML's teacher learns from the labels only"),
    Mutant("kdcl-ensemble-not-detached", "distillers/logit.py", "e = min_logit_ensemble([s.detach(), t.detach()], y)",
           "e = min_logit_ensemble([s, t], y)", [SEM, *TEACHER_MOVES], "KDCL's ensemble target carries gradients"),
    Mutant("kdcl-max-logit", "distillers/logit.py", "return torch.stack(shifted).amin(dim=0)",
           "return torch.stack(shifted).amax(dim=0)", [SEM, *TEACHER_MOVES], "MaxLogit instead of MinLogit"),
    Mutant("feature-teacher-not-detached", "distillers/logit.py",
           "        t_feats = {k: _detach(v) for k, v in t_feats.items()}\n", "", [SEM, FEAT],
           "pesf+NAME: the feature loss reaches the teacher's adapters"),
    Mutant("feature-weight-ignored", "distillers/logit.py",
           "beta = self.cfg.feat_weight if self.cfg.feat_weight is not None else term.default_weight",
           "beta = term.default_weight", [SEM, FEAT], "feat_weight (beta) from the config ignored"),
    Mutant("frozen-teacher-trains-bn", "distillers/base.py",
           'self.teacher.train(mode and self.cfg.teacher_bn == "train")', "self.teacher.train(mode)",
           [SEM, *CIFAR_RUNS], "the frozen teacher runs in train mode (BatchNorm statistics drift)"),
    Mutant("adapter-lr", "distillers/base.py", '''"lr": self.cfg.adapter_lr''', '''"lr": self.cfg.teacher_lr''',
           [SEM, ENGINE, *CIFAR_RUNS], "adapters trained at the teacher lr"),
    # models/common.py
    Mutant("frozen-backbone-train-mode", "models/common.py", "                    child.train(False)",
           "                    child.train(mode)", [SEM, MODELS, *CIFAR_RUNS],
           "PESF's frozen backbone in train mode (BatchNorm statistics of the teacher move)"),
    # distillers/feature.py and nlp.py: the feature terms
    Mutant("pkt-direction", "distillers/feature.py", "return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()",
           "return (p_s * torch.log((p_s + eps) / (p_t + eps))).mean()", [FEAT, SEM], "PKT's KL the wrong way"),
    Mutant("rkd-weights-swapped", "distillers/feature.py",
           "return rkd_loss(s_feats[\"pooled\"], t_feats[\"pooled\"], self.w_dist, self.w_angle)",
           "return rkd_loss(s_feats[\"pooled\"], t_feats[\"pooled\"], self.w_angle, self.w_dist)", [FEAT, SEM],
           "RKD's distance and angle weights swapped"),
    Mutant("at-includes-stem", "distillers/feature.py",
           'return sum(attention_loss(s, t) for s, t in zip(s_feats["stages"][1:], t_feats["stages"][1:]))',
           'return sum(attention_loss(s, t) for s, t in zip(s_feats["stages"], t_feats["stages"]))', [FEAT, SEM],
           "AT also on the stem"),
    Mutant("vid-no-log-variance", "distillers/feature.py", "/ var + var.log())).mean()", "/ var)).mean()", [FEAT, SEM],
           "VID's NLL without the log-variance term"),
    Mutant("crd-own-bank", "distillers/feature.py", "out_s = torch.exp(torch.bmm(self.memory_t[idx]",
           "out_s = torch.exp(torch.bmm(self.memory_s[idx]", [FEAT, SEM],
           "CRD's student anchor scored against its own bank"),
    Mutant("crd-bank-not-normalised", "distillers/feature.py",
           "memory.index_copy_(0, index, F.normalize(mixed, dim=1))",
           "memory.index_copy_(0, index, mixed)", [FEAT, SEM, *RESUME], "CRD's bank rows not renormalised"),
    Mutant("crd-negatives-any-class", "distillers/feature.py",
           "return torch.cat([index[:, None], pos if order is None else order[pos]], 1)",
           "return torch.cat([index[:, None], pos], 1)", [OBJECTIVES, SEM], "CRD's negatives drawn from every class"),
    Mutant("feature-alone-ce-weight", "distillers/logit.py", 'losses = {"ce": F.cross_entropy(s.to(',
           'losses = {"ce": 0.1 * F.cross_entropy(s.to(', [OBJECTIVES, FEAT, SEM],
           "--method NAME with KD's 0.1 on its CE"),
    Mutant("pkd-unnormalised", "distillers/nlp.py",
           "return F.mse_loss(F.normalize(_fp32(s), dim=-1), F.normalize(_fp32(t), dim=-1))",
           "return F.mse_loss(_fp32(s), _fp32(t))", NLP, "PKD without L2-normalising the [CLS] vectors"),
    Mutant("pkd-layer-map", "distillers/nlp.py", "return [(k, k * step) for k in range(1, student_layers)]",
           "return [(k, k * step - 1) for k in range(1, student_layers)]", NLP,
           "PKD maps onto the wrong teacher layers"),
    Mutant("tinybert-no-mask", "distillers/nlp.py",
           'keep = s_feats["attention_mask"][:, None, None, :].bool()',
           'keep = torch.ones_like(s_feats["attention_mask"][:, None, None, :]).bool()', NLP,
           "TinyBERT compares the scores of padded keys"),
    Mutant("tinybert-no-embeddings", "distillers/nlp.py", "hidden = [(m, m * step) for m in range(student_layers + 1)]",
           "hidden = [(m, m * step) for m in range(1, student_layers + 1)]", NLP,
           "TinyBERT without the embedding-layer loss"),
    # engine.py: the training loop
    Mutant("resume-no-rng", "engine.py", "        checkpoints.set_rng_state(ckpt[\"rng\"])\n", "", RESUME,
           "--resume without restoring the RNG state (the issue's third example)"),
    Mutant("no-zero-grad", "engine.py",
           "            if self.pending == 0:\n                self.optimizer.zero_grad(set_to_none=True)\n            count =",
           "            count =", [ENGINE, LOOP, *CIFAR_RUNS], "gradients accumulate across steps"),
    Mutant("eval-no-all-reduce", "engine.py", "    all_reduce_sum(counts)\n", "", DIST_EVAL,
           "accuracy counts not all-reduced across ranks"),
    Mutant("ddp-bn-not-averaged", "engine.py", "        all_reduce_sum(sums)\n        average_buffers(distiller, dist_info)\n",
           "        all_reduce_sum(sums)\n", DIST_EVAL,
           "BatchNorm statistics left per rank before the evaluation and the checkpoint"),
    Mutant("eval-teacher-is-student", "engine.py", "for offset, logits in ((1, s), (5, t)):",
           "for offset, logits in ((1, s), (5, s if t is not None else None)):", METRICS,
           "teacher accuracy computed from the student's logits"),
    Mutant("eval-train-mode", "engine.py", "    import kd_core\n    distiller.eval()\n", "    import kd_core\n",
           [ENGINE, LOOP, *CIFAR_RUNS], "evaluation in train mode (BatchNorm batch statistics)"),
    Mutant("train-loss-not-per-rank", "engine.py", "float(v) / (len(train) * dist_info.world)", "float(v) / len(train)",
           [f"{CIFAR}::test_ddp_two_processes_match_one", LOOP], "logged train losses summed over ranks"),
    Mutant("lr-compounds", "engine.py", 'group["lr"] = base * factor', 'group["lr"] = group["lr"] * factor',
           [ENGINE, LOOP], "the schedule scales the current lr, not the base lr"),
    # data paths of the three scripts
    Mutant("cifar-no-flip", "train_cifar.py", "flip = torch.rand(len(idx), generator=aug, device=self.device) < 0.5",
           "flip = torch.rand(len(idx), generator=aug, device=self.device) < 0.0", CIFAR_DATA,
           "horizontal flip silently off"),
    Mutant("cifar-no-crop", "train_cifar.py",
           "shift = torch.randint(0, 9, (2, len(idx)), generator=aug, device=self.device)",
           "shift = torch.randint(4, 5, (2, len(idx)), generator=aug, device=self.device)", CIFAR_DATA,
           "random crop silently off (always the centre)"),
    Mutant("cifar-same-order-every-epoch", "train_cifar.py",
           'gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + epoch)',
           'gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003)', CIFAR_DATA,
           "the same permutation every epoch"),
    Mutant("cifar-eval-shard-overlap", "train_cifar.py",
           "index = torch.arange(self.rank, len(self.labels), self.world, device=self.device)",
           "index = torch.arange(0, len(self.labels), self.world, device=self.device)", DIST_EVAL,
           "every rank evaluates rank 0's shard"),
    Mutant("glue-eval-shard-overlap", "train_glue.py",
           "index = torch.argsort(self.data.lengths, stable=True)[self.rank::self.world]",
           "index = torch.argsort(self.data.lengths, stable=True)[0::self.world]",
           [f"{GLUE}::test_batches_pad_to_the_longest_row_and_shard_the_global_batch", LOOP],
           "every GLUE rank evaluates rank 0's shard"),
    Mutant("imagenet-no-flip", "imagenet_data.py",
           "T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])",
           "T.Compose([T.RandomResizedCrop(size), T.PILToTensor()])",
           ["tests/test_train_imagenet.py", LOOP], "ImageNet training without the horizontal flip"),
    Mutant("imagenet-gpu-decodes-odd-files", "imagenet_data.py", 'if self.decode == "gpu" and kind == 0:',
           'if self.decode == "gpu" and kind in (0, 1, 2):', ["tests/test_imagenet_data.py"],
           "the gpu path leaves CMYK and grayscale JPEGs to the device decoder instead of the PIL fallback"),
    Mutant("imagenet-flip-rate", "imagenet_data.py", "int(torch.rand(1) < 0.5)", "int(torch.rand(1) < 0.3)",
           ["tests/test_imagenet_data.py"], "the cpu and gpu paths flip 30 % of the images"),
    Mutant("imagenet-crop-scale", "imagenet_data.py", "SCALE, RATIO = (0.08, 1.0)", "SCALE, RATIO = (0.25, 1.0)",
           ["tests/test_imagenet_data.py"], "the cpu and gpu paths crop at least a quarter of the image"),
    # distillers/staged.py and stages.run_stages: TAKD, RCO, SFTN (issue 12)
    Mutant("sftn-kl-direction", "distillers/staged.py", "kd_core.kl_div(t, b, tau)", "kd_core.kl_div(b, t, tau)",
           STAGED, "SFTN's branch KL with teacher and branch swapped"),
    Mutant("sftn-kl-weight", "distillers/staged.py", "w_branch_ce, w_branch_kl, branch_tau = 1.0, 3.0, 1.0",
           "w_branch_ce, w_branch_kl, branch_tau = 1.0, 1.0, 1.0", STAGED, "SFTN's branch KL weighted 1, not 3"),
    Mutant("rco-schedule-shifted", "distillers/staged.py", "min(anchors - 1, epoch * anchors // epochs)",
           "min(anchors - 1, (epoch + 1) * anchors // epochs)", STAGED, "RCO switches anchors one epoch early"),
    Mutant("rco-never-switches", "distillers/staged.py", "        if index != self.anchor:\n",
           "        if False:\n", STAGED, "RCO keeps the converged teacher throughout"),
    Mutant("sftn-bert-cut", "distillers/staged.py", "(k * n // self.groups, k * m // self.groups)",
           "(k * n // self.groups, k * m // self.groups + 1)", STAGED, "SFTN's BERT branch enters the wrong student layer"),
    Mutant("takd-student-skips-assistant", "distillers/staged.py",
           'stages.Stage("student", "kd", teacher_from="assistant")', 'stages.Stage("student", "kd")',
           [*STAGED, "tests/test_staged.py::test_takd_sftn_rco_on_real_cifar"],
           "TAKD's student learns from the teacher, not the assistant"),
    Mutant("sftn-finetunes-by-default", "train_cifar.py",
           '    if stage.trains == "teacher" and cfg.sftn_teacher_init == "scratch":\n', "    if False:\n",
           ["tests/test_staged.py::test_sftn_trains_its_teacher_from_scratch_unless_told_to_fine_tune"],
           "SFTN's stage 1 keeps the run's teacher_lr instead of the teacher's own protocol"),
    Mutant("grad-accum-reset-ignored", "engine.py",
           'count = batch + 1 if self.grad_accum_reset == "epoch" and batch is not None else self.calls',
           "count = self.calls", [FIDELITY, f"{LOOP}::test_resume_inside_a_gradient_accumulation_is_bit_identical"],
           "grad_accum_reset: epoch counts across epochs (the authors' count restarts every epoch)"),
    Mutant("drop-last-ignored", "train_cifar.py",
           "steps = n // self.batch_size if self.drop_last else -(-n // self.batch_size)",
           "steps = n // self.batch_size", [FIDELITY], "drop_last: false still drops the partial batch"),
    Mutant("stages-never-skipped", "stages.py", "        if stage.name in done:\n", "        if False:\n",
           STAGED, "--resume redoes the stages already finished"),
    Mutant("stage-paths-absolute", "engine.py", 'v.startswith(inside)', 'v.startswith(inside + "never/")',
           STAGED, "a moved multi-stage run folder cannot resume (its stages' paths compared as absolute)"),
    # multirun.py: concurrent runs in one process (issue 10)
    Mutant("multirun-rng-shared", "multirun.py", "                checkpoints.set_rng_state(run.rng)\n",
           "                pass\n", MULTIRUN, "interleaved runs draw from one another's random state"),
    Mutant("multirun-results-in-finish-order", "multirun.py", "return [self.results[i] for i in sorted(self.results)]",
           "return list(self.results.values())", MULTIRUN, "summaries no longer in the order of the runs"),
    Mutant("multirun-one-failure-stops-all", "multirun.py", "            self.failures.append((run.job, err))\n",
           "            raise\n", MULTIRUN, "one failed run takes the others down with it"),
    Mutant("multirun-slot-not-refilled", "multirun.py", "        self._fill()\n        return FINISHED\n",
           "        return FINISHED\n", MULTIRUN, "a finished run's slot never goes to the next job"),
    # runfolder.py: one writer per run folder, no overwrite, preemption (issue 21)
    Mutant("lock-shared", "runfolder.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
           [f"{RUN_FOLDER}::test_the_lock_is_held_for_every_stage_and_released_after_the_run",
            f"{RUN_FOLDER}::test_a_second_process_is_refused_and_sigterm_saves_a_checkpoint_that_resumes_bit_identically"], "two processes may write one run folder"),
    Mutant("overwrite-unchecked", "runfolder.py", "    if found and not resume and not overwrite:\n",
           "    if found and not resume and not overwrite and False:\n",
           [f"{RUN_FOLDER}::test_the_same_command_again_is_refused_and_overwrite_starts_afresh"],
           "the same command again overwrites a finished run"),
    Mutant("stop-without-checkpoint", "engine.py", "(stop or save_every and (i + 1) % save_every == 0)",
           "(save_every and (i + 1) % save_every == 0)",
           [f"{RUN_FOLDER}::test_sigusr1_in_one_process_saves_mid_epoch_and_resumes_bit_identically"], "SIGTERM stops without saving the step"),
    Mutant("stop-ranks-disagree", "runfolder.py", "    if step is not None and (step + 1) % STOP_CHECK_EVERY:\n"
           "        return None\n", "    return _stop_signal\n",
           [f"{RUN_FOLDER}::test_torchrun_sigterm_all_ranks_stop_at_one_step_without_a_traceback"],
           "under torchrun each rank stops on its own signal (the others hang or go on)"),
    Mutant("alpha-lower-bound", "engine.py", "not 0 <= values[key] <= 1", "not values[key] <= 1",
           ["tests/test_bad_input.py::test_cifar_bad_values_leave_the_run_intact"],
           "a negative alpha trains with a CE weight above 1"),
    Mutant("torn-metrics-line-kept", "engine.py", "                if number < len(lines):\n",
           "                if True:\n",
           [f"{RUN_FOLDER}::test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_broken_one_named"], "a torn last metrics line blocks --resume"),
    Mutant("fresh-resume-keeps-metrics", "engine.py", "        log.truncate_metrics(0)   # rows",
           "        pass   # rows",
           [f"{RUN_FOLDER}::test_a_restart_under_resume_drops_the_rows_of_an_unsaved_epoch"], "a restart under --resume appends to the old metrics"),
]


def _copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "runs", "data", "__pycache__", ".pytest_cache", "*.pyc")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _selectors(mutant: Mutant, root: Path) -> list[str]:
    return [s for s in mutant.tests if (root / s.split("::")[0]).is_file()]


def _pytest(root: Path, selectors: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'no tests', seconds, output tail)."""
    shared = os.environ.get("PESF_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1", "PESF_SHARED_DATA": shared}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *selectors]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started, ""
    seconds = time.perf_counter() - started
    tail = (proc.stdout + proc.stderr)[-2000:]
    outcome = {0: "passed", 5: "no tests"}.get(proc.returncode, "failed")
    return outcome, seconds, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", default="", help="comma-separated mutant names")
    p.add_argument("--baseline", action="store_true", help="run each mutant's tests on the untouched code")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as caught)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--verbose", action="store_true", help="show the test output of surviving mutants")
    args = p.parse_args(argv)
    names = {m.name for m in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("error: duplicate mutant names")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - names
    if unknown:
        raise SystemExit(f"error: unknown mutant(s) {', '.join(sorted(unknown))}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path:22s} {m.note}")
        print(f"{len(chosen)} mutants")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        root = Path(scratch)
        _copy_repo(root)
        for i, m in enumerate(chosen, 1):
            target = root / m.path
            original = target.read_text()
            selectors = _selectors(m, root)
            if original.count(m.old) != 1:
                status, seconds, tail = "stale", 0.0, f"'old' occurs {original.count(m.old)} times in {m.path}"
            elif args.baseline:
                status, seconds, tail = _pytest(root, selectors, args.timeout)
            else:
                target.write_text(original.replace(m.old, m.new))
                try:
                    status, seconds, tail = _pytest(root, selectors, args.timeout)
                finally:
                    target.write_text(original)
                status = {"failed": "caught", "timeout": "caught (timeout)", "passed": "survived"}.get(status, status)
            results.append({"name": m.name, "path": m.path, "status": status, "seconds": round(seconds, 1),
                            "tests": selectors, "note": m.note})
            print(f"[{i}/{len(chosen)}] {m.name:32s} {status:16s} {seconds:6.1f} s  {m.note}", flush=True)
            if args.verbose and status not in ("caught", "passed"):
                print(tail)
    if args.baseline:
        bad = [r for r in results if r["status"] != "passed"]
        print(f"baseline: {len(results) - len(bad)}/{len(results)} mutants' tests pass on the untouched code")
    else:
        caught = sum(r["status"].startswith("caught") for r in results)
        print(f"mutation score: {caught}/{len(results)} caught")
        for r in results:
            if not r["status"].startswith("caught"):
                print(f"  {r['status']}: {r['name']} ({r['note']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
