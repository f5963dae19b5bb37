"""Writes configs/cifar/: one YAML per cell of the paper's Tables 1 and 7 (and the teacher runs).

Defaults (the protocol of Tian et al. 2020: SGD 0.05, batch 64, 240 epochs, x0.1 at 150/180/210)
live in train_cifar.CifarConfig; each YAML states only what makes its cell. Run again after
changing the tables below: python configs/make_cifar_configs.py
"""
from pathlib import Path

PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("vgg13", "vgg8"), ("resnet56", "vgg8"),
         ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2")]
# Table 1 / Table 7 rows: (file stem, method, extra keys, paper row name)
ROWS = [("kd", "kd", {}, "Vanilla KD"), ("dml", "dml", {}, "DML"), ("kdcl", "kdcl", {}, "KDCL"),
        ("ftkd", "ftkd", {}, "FT-KD"), ("pesf", "pesf", {}, "PESF-KD"),
        ("pesf_noadj", "pesf", {"label_adjust": False}, "PESF-KD without label adjustment (dagger rows)"),
        ("ce", "ce", {}, "student trained from scratch (baseline)")]
ROOT = Path(__file__).resolve().parent / "cifar"


def teacher_ckpt(arch: str) -> str:
    # The last epoch, not the best: choosing a teacher by test accuracy would tune on the test set.
    return f"runs/cifar/ce_{arch}_s0/last.pt"


def write(path: Path, comment: str, keys: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in keys.items())
    path.write_text(f"# {comment}\n{body}")


def main() -> None:
    for arch in sorted({t for t, _ in PAIRS}):
        write(ROOT / "teachers" / f"{arch}.yaml", f"Teacher {arch}: trained from scratch with CE, seed 0",
              {"method": "ce", "student": arch})
    for teacher, student in PAIRS:
        for stem, method, extra, row in ROWS:
            keys = {"method": method, "teacher": teacher, "student": student}
            if method != "ce":
                keys["teacher_ckpt"] = teacher_ckpt(teacher)
            keys.update(extra)
            write(ROOT / f"{teacher}_{student}" / f"{stem}.yaml",
                  f"Tables 1 and 7, {row}: {teacher} -> {student}", keys)


if __name__ == "__main__":
    main()
