"""Two-process CPU DDP (gloo) fit of the tokenizer: the EMA codebook, its statistics, the restarts
and the data-initialised pixel bias stay identical on both ranks (they are buffers / data-dependent
initialisations that DDP's gradient all-reduce alone would not keep in sync)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys
    import torch, lightning as L
    from whale_pl.data.datamodule import ClipDataModule
    from whale_pl.lit.tokenizer_module import TokenizerModule

    data_dir, out_dir = sys.argv[1], sys.argv[2]

    class Tok(TokenizerModule):
        def on_train_end(self):
            torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                       f"{out_dir}/rank{self.global_rank}.pt")

    L.seed_everything(0)
    m = Tok(net=dict(frame_size=[32, 32], patch_size=8, dim=32, enc_depth=1, dec_depth=1, heads=2, codebook_size=32,
                     code_dim=8, ema_decay=0.5, restart_threshold=0.5), optim=dict(lr=3e-3, warmup_steps=1))
    dm = ClipDataModule(data_dir, clip_len=4, batch_size=2, num_workers=0, steps_per_epoch=3, val_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(m, datamodule=dm)
''')


@pytest.mark.ddp
def test_two_process_ddp_keeps_codebook_in_sync(tiny_shards, tmp_path):
    script = tmp_path / "ddp_tok.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), str(tiny_shards), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert bool(s0["pixel_bias_initialized"]) and bool(s0["quantizer.initialized"])
