"""GPU timings of NABLA against the best dense SDPA: per attention call and per transformer step (`nabla-convert bench`).

Everything here runs on one CUDA device with random weights at real shapes: speed does not depend
on the weights, but a threshold's density does (random Q/K give near-uniform pooled maps, so a
threshold t keeps about a fraction t of the blocks). `density=` forces a density instead: each
query-block row keeps that fraction of its key blocks, chosen at random.

Dense runs on the model's own raster tokens; NABLA runs on the padded tile-order tokens (the
model's real path), so padding costs count against NABLA.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from nabla_convert.attention import BlockSelection, TileLayout, nabla_block_mask, nabla_selection, to_block_mask
from nabla_convert.attention.flex import compiled_flex_attention, enable_compile_cache, kernel_options_for
from nabla_convert.bench.report import OWN_IMPLEMENTATION, BenchReport
from nabla_convert.config import NablaConfig
from nabla_convert.errors import NablaError
from nabla_convert.models.family import ModelFamily
from nabla_convert.models.nabla import NablaAttnProcessor, apply_nabla, layer_densities, remove_nabla, set_processors

DENSE_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


class GPUUnavailableError(NablaError, RuntimeError):
    """Raised by every benchmark on a machine without a CUDA device."""


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise GPUUnavailableError("nabla-convert bench needs a CUDA GPU and this machine has none (torch sees no CUDA)")
    return torch.device("cuda")


def parse_resolution(text: str) -> tuple[int, int]:
    """'1280x720' -> (width, height); both multiples of 16 as the video pipelines require."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must look like 1280x720 (width x height), got {text!r}") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ValueError(f"resolution sides must be positive multiples of 16, got {width}x{height}")
    return width, height


def environment() -> dict[str, str]:
    """Card, torch and date: every benchmark record carries them."""
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "date": date.today().isoformat(),
        "host": platform.node(),
    }


def cuda_ms(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() on the current CUDA stream (wall clock where there is no CUDA)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_qkv(batch: int, heads: int, tokens: int, head_dim: int = 128, requires_grad: bool = False):
    """q, k, v (B, H, S, D) bf16 on CUDA, laid out (B, S, H, D) in memory as the model processors produce them."""
    return tuple(
        torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        .transpose(1, 2)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )


def dense_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int = 5) -> dict[str, float]:
    """Forward ms of each SDPA backend that accepts these inputs."""
    times = {}
    for name, backend in DENSE_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                times[name] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        except RuntimeError:
            continue
    return times


def forced_keep(
    layout: TileLayout,
    batch: int,
    heads: int,
    density: float,
    q_block: int,
    kv_block: int,
    seed: int = 0,
    device: torch.device | str = "cuda",
) -> torch.Tensor:
    """Random selection with `density` of the real key blocks in every query-block row (B, H, nq, nk)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    nq, nk = layout.padded_len // q_block, layout.padded_len // kv_block
    kv_real = layout.indices(device).valid.view(nk, kv_block).any(-1)
    per_row = max(1, round(density * int(kv_real.sum())))
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(batch, heads, nq, nk, device=device, generator=generator).masked_fill(~kv_real, -1.0)
    chosen = scores.topk(per_row, dim=-1).indices
    return torch.zeros(batch, heads, nq, nk, dtype=torch.bool, device=device).scatter_(-1, chosen, True)


def block_mask_for(keep: torch.Tensor, layout: TileLayout, q_block: int, kv_block: int, for_backward: bool = False):
    """The BlockMask the runtime gives compiled CUDA kernels for this selection (valid-only mask_mod)."""
    valid = layout.indices("cuda").valid if layout.is_padded else None
    selection = BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid)
    return selection.block_mask(for_backward, compiled=True)


def sparse_attention_ms(q, k, v, block_mask, q_block: int, kv_block: int, backward: bool = False, reps: int = 5):
    """Compiled flex ms (forward, or forward+backward) and the first call's ms (compile included)."""
    options = kernel_options_for(q_block, kv_block)

    def call():
        out = compiled_flex_attention(q, k, v, block_mask, kernel_options=options)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    return cuda_ms(call, reps), first_ms


@dataclass
class AttentionRow:
    tokens: int
    padded_tokens: int
    heads: int
    q_block: int
    kv_block: int
    density: float
    mask_fast_ms: float
    mask_reference_ms: float | None
    sparse_ms: float
    dense_ms: float
    dense_backend: str
    compile_s: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / (self.sparse_ms + self.mask_fast_ms)

    @property
    def target_ms(self) -> float:
        """The target for the sparse kernel: 1.3 x density x dense (a kernel at 30% overhead over perfect sparsity)."""
        return 1.3 * self.density * self.dense_ms


def attention_rows(
    token_grid_: tuple[int, int, int],
    heads: int,
    densities: Sequence[float],
    *,
    q_block: int = 128,
    kv_block: int = 64,
    batch: int = 1,
    threshold: float = 0.7,
    sta: tuple[int, int, int] | None = None,
    reference_mask: bool = True,
    reps: int = 5,
    head_dim: int = 128,
) -> list[AttentionRow]:
    """Per attention call at the given densities: fast mask build, sparse flex, and dense SDPA side by side.

    The mask build is timed at `threshold` (its cost does not depend on the density it yields);
    the attention runs on a forced random selection of each density.
    """
    layout = TileLayout.for_blocks(token_grid_, (8, 8), q_block, kv_block)
    q, k, v = random_qkv(batch, heads, layout.padded_len, head_dim)
    dense_q, dense_k, dense_v = (t[:, :, : layout.num_tokens] for t in (q, k, v))
    dense = dense_times(dense_q, dense_k, dense_v, reps)
    dense_backend = min(dense, key=dense.get)
    kwargs = dict(threshold=threshold, grid=layout, sta=sta, q_block=q_block, kv_block=kv_block)
    fast_ms = cuda_ms(lambda: nabla_selection(q, k, **kwargs).block_mask(), reps, warmup=2)
    reference_ms = None
    if reference_mask:
        valid = layout.indices("cuda").valid if layout.is_padded else None
        reference_ms = cuda_ms(
            lambda: to_block_mask(nabla_block_mask(q, k, **kwargs), q_block=q_block, kv_block=kv_block, valid=valid),
            reps,
        )
    rows = []
    for density in tqdm(densities, desc=f"attention {layout.num_tokens} tokens", leave=False):
        block_mask = block_mask_for(
            forced_keep(layout, batch, heads, density, q_block, kv_block), layout, q_block, kv_block
        )
        sparse_ms, first_ms = sparse_attention_ms(q, k, v, block_mask, q_block, kv_block, reps=reps)
        rows.append(
            AttentionRow(
                layout.num_tokens,
                layout.padded_len,
                heads,
                q_block,
                kv_block,
                density,
                fast_ms,
                reference_ms,
                sparse_ms,
                dense[dense_backend],
                dense_backend,
                max(0.0, (first_ms - sparse_ms) / 1e3),
            )
        )
    return rows


def error_line(err: Exception) -> str:
    """A failure as one short line for a result row (a kernel the card cannot build is a result, not a crash)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


@dataclass
class StepRow:
    arch: str
    layers: int
    tokens: int
    padded_tokens: int
    density: float | None
    threshold: float | None
    measured_density: float | None
    dense_ms: float
    nabla_ms: float
    dense_peak_gib: float
    nabla_peak_gib: float
    compile_s: float
    compiled: bool = False
    graph_breaks: int | None = None
    implementation: str = OWN_IMPLEMENTATION
    error: str | None = None  # the run failed (NaN times): its one-line error

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.nabla_ms


class ForcedSelections:
    """One random selection per (batch, heads, layout, density), shared by every layer of a model.

    A selection per layer would keep 40 index sets alive at once (measured: 11 GiB more peak memory
    than the real path at 14B 720p); the real path holds one selection at a time.
    """

    def __init__(self) -> None:
        self.cache: dict[tuple, BlockSelection] = {}

    def get(self, q: torch.Tensor, layout: TileLayout, density: float, q_block: int, kv_block: int) -> BlockSelection:
        key = (q.shape[0], q.shape[1], layout, density, q_block, kv_block)
        if key not in self.cache:
            self.cache.clear()
            keep = forced_keep(layout, q.shape[0], q.shape[1], density, q_block, kv_block, device=q.device)
            valid = layout.indices(q.device).valid if layout.is_padded else None
            self.cache[key] = BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid)
        return self.cache[key]


class ForcedDensityProcessor(NablaAttnProcessor):
    """NablaAttnProcessor whose selection is swapped for a random one of a forced `density` (eager runs only).

    The real selection still runs, so its cost stays in the step time.
    """

    def __init__(self, base: NablaAttnProcessor, density: float, forced: ForcedSelections) -> None:
        super().__init__(base.layer, base.settings, base.state)
        self.density = density
        self.forced = forced

    def select(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout) -> BlockSelection:
        super().select(q, k, layout)
        config = self.state.config
        return self.forced.get(q, layout, self.density, config.q_block, config.kv_block)


@contextmanager
def compiled_blocks(model: torch.nn.Module, reset: bool = True, **compile_kwargs: Any) -> Iterator[None]:
    """diffusers' regional compile (`compile_repeated_blocks`), undone on exit (the blocks run eager again).

    `reset` starts from a fresh dynamo state; without it, graphs compiled earlier in the process for
    the same shapes are reused.
    """
    if reset:
        torch._dynamo.reset()
    model.compile_repeated_blocks(**compile_kwargs)
    try:
        yield
    finally:
        for module in model.modules():
            if type(module).__name__ in model._repeated_blocks:
                module._compiled_call_impl = None


def timed_call(fn: Callable[[], Any], reps: int) -> tuple[float, float, float]:
    """(first call s, median ms of `reps` more calls, peak GiB): the first call compiles or warms up."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    ms = cuda_ms(fn, reps, warmup=0)
    return first_s, ms, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def random_transformer(family: ModelFamily, model_config: dict[str, Any], layers: int | None = None):
    """The family's transformer of `model_config` with random bf16 weights on CUDA (`layers` blocks at real width
    if given: a 14B model at 720p needs ~10 s a dense step)."""
    if layers is not None:
        model_config = family.with_layers(model_config, layers)
    with torch.device("cuda"):
        return bf16_model(family.transformer_classes[0](**model_config)).eval()


def bf16_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model in bf16 as from_pretrained(torch_dtype=bf16) gives it: its `_keep_in_fp32_modules` stay float32
    (e.g. time embeddings and modulations that take float32 inputs)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            module.to(torch.float32)
    return model


def transformer_step_rows(
    family: ModelFamily,
    arch: str,
    model_config: dict[str, Any],
    resolution: tuple[int, int],
    frames: int,
    nabla: NablaConfig,
    densities: Sequence[float | None],
    *,
    thresholds: Sequence[float] = (),
    layers: int | None = None,
    batch: int = 1,
    dense_backend: str = "cudnn",
    reps: int = 3,
    compiled: Sequence[bool] = (False,),
    model: torch.nn.Module | None = None,
    builtin: Sequence[bool] = (),
) -> list[StepRow]:
    """Transformer forward time, dense (best SDPA) vs NABLA, eager and/or compiled, in one process.

    NABLA runs at each threshold of `thresholds` (the real selection; its measured density is
    reported) and at each forced density of `densities` (None = the config's threshold; forced
    densities run eager only). Compiled = diffusers' `compile_repeated_blocks()`, dense and NABLA
    alike. Builds the family's transformer of `model_config` with random bf16 weights (truncated to
    `layers` blocks when given) unless `model` is passed; inputs are the family's random inputs.
    `builtin` (modes: True = compiled) adds a row of the family's own NABLA in diffusers (`ModelFamily.builtin_nabla`)
    at the config's threshold and window, compiled the same way (eager, its flex attention is unfused: small shapes).
    """
    from torch._dynamo.utils import counters

    model = model if model is not None else random_transformer(family, model_config, layers)
    grid = family.token_grid(resolution, frames, family.patch_size(model.config))
    inputs = family.random_inputs(model, grid, batch, model.device, model.dtype)
    layout = TileLayout.for_blocks(grid, nabla.tile, nabla.q_block, nabla.kv_block)
    settings = [(None, t) for t in thresholds] + [(d, None) for d in densities if d is not None]
    if not settings:
        settings = [(None, nabla.threshold)]

    def forward(**extra):
        with torch.no_grad():
            return model(**inputs, **extra, return_dict=False)[0]

    def row(first_s, ms, peak, is_compiled, breaks_before, **fields):
        return StepRow(
            arch,
            family.num_layers(model.config),
            layout.num_tokens,
            layout.padded_len,
            dense_ms=dense_ms,
            nabla_ms=ms,
            dense_peak_gib=dense_peak,
            nabla_peak_gib=peak,
            compile_s=max(0.0, first_s - ms / 1e3),
            compiled=is_compiled,
            graph_breaks=sum(counters["graph_break"].values()) - breaks_before if is_compiled else None,
            **fields,
        )

    rows = []
    for is_compiled in compiled:
        context = compiled_blocks(model) if is_compiled else nullcontext()
        with context, sdpa_kernel([DENSE_BACKENDS[dense_backend], *DENSE_BACKENDS.values()], set_priority=True):
            remove_nabla(model)
            _, dense_ms, dense_peak = timed_call(forward, reps)
            if is_compiled in builtin:
                breaks_before = sum(counters["graph_break"].values())
                failed = None
                try:
                    with family.builtin_nabla(model, grid, nabla) as extra:
                        timed = timed_call(lambda extra=extra: forward(**extra), reps)
                except Exception as err:  # diffusers' own code failing on this card or shape is a result
                    failed, timed = error_line(err), (0.0, float("nan"), float("nan"))
                rows.append(
                    row(
                        *timed,
                        is_compiled,
                        breaks_before,
                        density=None,
                        threshold=nabla.threshold,
                        measured_density=None,
                        implementation="diffusers built-in",
                        error=failed,
                    )
                )
            for density, threshold in tqdm(settings, desc=f"{arch} step", leave=False):
                if density is not None and is_compiled:
                    continue
                apply_nabla(model, nabla if threshold is None else replace(nabla, threshold=threshold))
                if density is not None:
                    forced = ForcedSelections()
                    set_processors(model, lambda _, base, d=density, f=forced: ForcedDensityProcessor(base, d, f))
                breaks_before = sum(counters["graph_break"].values())
                timed = timed_call(forward, reps)
                measured = statistics.fmean(layer_densities(model).values())
                rows.append(
                    row(
                        *timed,
                        is_compiled,
                        breaks_before,
                        density=density,
                        threshold=threshold,
                        measured_density=measured if density is None else None,
                    )
                )
            remove_nabla(model)
    return rows


def run_bench(
    *,
    family: ModelFamily,
    arch: str,
    model_config: dict[str, Any],
    resolution: tuple[int, int],
    frames: int,
    nabla: NablaConfig,
    densities: Sequence[float] = (),
    layers: int | None = 4,
    batch: int = 1,
    attention: bool = True,
    step: bool = True,
    compiled: bool = False,
    builtin: bool = False,
) -> BenchReport:
    """Per attention call and per transformer step: forced densities if given, else the config's threshold.

    `compiled` adds step rows with diffusers' `compile_repeated_blocks()` (dense and NABLA; real thresholds only).
    `builtin` adds step rows of the family's own NABLA in diffusers, compiled only (eager, its flex is unfused).
    """
    require_cuda()
    enable_compile_cache()
    heads, head_dim = family.attention_shape(model_config)
    grid = family.token_grid(resolution, frames, family.patch_size(model_config))
    report = BenchReport(
        environment(),
        {
            "arch": arch,
            "resolution": list(resolution),
            "frames": frames,
            "token_grid": list(grid),
            "layers": layers,
            "batch": batch,
            "densities": list(densities),
            "nabla": nabla.to_dict(),
        },
    )
    forced = list(densities) if densities else [None]
    if attention:
        attention_densities = forced if densities else [nabla.threshold]
        report.attention = attention_rows(
            grid,
            heads,
            attention_densities,
            q_block=nabla.q_block,
            kv_block=nabla.kv_block,
            batch=batch,
            threshold=nabla.threshold,
            sta=nabla.sta,
            head_dim=head_dim,
        )
    if builtin and not family.has_builtin_nabla():
        raise ValueError(f"{arch}: diffusers has no built-in NABLA for the {family.name} family")
    if step:
        dense_backend = report.attention[0].dense_backend if report.attention else "cudnn"
        report.steps = transformer_step_rows(
            family,
            arch,
            model_config,
            resolution,
            frames,
            nabla,
            forced,
            layers=layers,
            batch=batch,
            dense_backend=dense_backend,
            compiled=(False, True) if compiled or builtin else (False,),
            builtin=(True,) if builtin else (),
        )
    return report
