"""eval: compare two video pipelines (e.g. dense and NABLA) on the same prompts and seeds.

Quality is measured, never assumed: per sample latent and pixel PSNR/SSIM of B against A (`metrics`), the
flow-matching loss of each transformer on held-out latents and the per-layer block density of NABLA models
(`sampling`). `run.run_eval` loads two pipeline folders and writes report.md, eval.json (a "summary" object as in
the converted checkpoint's nabla_reports/), grid.png and samples.gif (`report`). The package itself imports
nothing, so `nabla-convert eval --help` loads no torch.
"""
