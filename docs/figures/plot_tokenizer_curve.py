"""Plot a tokenizer run's curve from its TensorBoard events: python docs/figures/plot_tokenizer_curve.py runs/demo/tokenizer OUT.png"""
import sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run, out = sys.argv[1], sys.argv[2]
acc = EventAccumulator(run, size_guidance={"scalars": 0}); acc.Reload()
tags = acc.Tags()["scalars"]
def series(t):
    ev = acc.Scalars(t); return [e.step for e in ev], [e.value for e in ev], [e.wall_time - ev[0].wall_time for e in ev]
fig, ax = plt.subplots(1, 3, figsize=(15, 4))
s, v, _ = series("val/psnr"); ax[0].plot(s, v, "o-", label="val PSNR (held-out episodes)")
if "train/psnr" in tags:
    s2, v2, _ = series("train/psnr"); ax[0].plot(s2, v2, alpha=0.4, label="train PSNR (batch)")
ax[0].axhline(28, ls="--", c="r", label="target 28 dB"); ax[0].set_xlabel("step"); ax[0].set_ylabel("dB"); ax[0].legend()
s, v, _ = series("val/codebook_usage"); ax[1].plot(s, v, "o-", label="val codebook usage")
if "train/codebook_usage" in tags:
    s2, v2, _ = series("train/codebook_usage"); ax[1].plot(s2, v2, "s-", label="train usage (epoch)")
ax[1].axhline(0.5, ls="--", c="r", label="target 50%"); ax[1].set_xlabel("step"); ax[1].legend()
s, v, _ = series("val/ssim"); ax[2].plot(s, v, "o-", label="val SSIM"); ax[2].set_xlabel("step"); ax[2].legend()
fig.suptitle(f"demo tokenizer ({run})"); fig.tight_layout(); fig.savefig(out, dpi=90)
for t in ["val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity"]:
    s, v, w = series(t); print(t, [(a, round(b, 3), int(c)) for a, b, c in zip(s, v, w)])
