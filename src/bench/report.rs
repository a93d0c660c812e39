//! The bench's results as data (`bench.json`) and as the Markdown report (`bench.md`) with the
//! seed report's tables: isolated ops, the mHC sublayer forward and forward+backward with
//! speedups and achieved bandwidth against the bytes floor, peak memory, correctness, and the
//! training-step table of `bench --train`.

use crate::bench::train::{self, TrainBench};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The layer variants of the seed report, in table order.
pub const REF_F32: &str = "candle-ops f32";
pub const REF_BF16: &str = "candle-ops bf16";
pub const FUSED_BF16: &str = "fused bf16";
pub const LAYER_VARIANTS: [&str; 3] = [REF_F32, REF_BF16, FUSED_BF16];
/// The isolated-op variants, in table order.
pub const FUSED_F32: &str = "fused f32";
pub const OP_VARIANTS: [&str; 4] = [REF_F32, REF_BF16, FUSED_F32, FUSED_BF16];

/// Target of the issue: fused bf16 forward+backward at the seed's configs at least this many
/// times faster than candle-ops f32.
pub const TARGET_SPEEDUP: f64 = 20.0;

/// Where and how the numbers were taken (the top of bench.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub gpu: String,
    pub driver: String,
    /// CUDA version the driver supports.
    pub cuda: String,
    /// Clocks at the start of the run as nvidia-smi reports them (current and maximum).
    pub clocks: String,
    pub versions: String,
    /// UTC, ISO 8601.
    pub date: String,
    pub command: String,
}

impl Header {
    /// Fills in what the host knows: nvidia-smi's view of GPU 0 (when nvidia-smi runs), the
    /// crate versions from Cargo.lock, the date and the command line. `gpu` and `cuda` are the
    /// caller's (from the device) and only replaced by nvidia-smi's name when they are empty.
    pub fn collect(gpu: String, cuda: String) -> Header {
        let smi = nvidia_smi(&[
            "name",
            "driver_version",
            "clocks.sm",
            "clocks.max.sm",
            "clocks.mem",
            "clocks.max.mem",
        ]);
        let field = |i: usize| {
            smi.as_ref()
                .and_then(|f| f.get(i).cloned())
                .unwrap_or_else(|| "unknown (nvidia-smi not available)".into())
        };
        let gpu = if gpu.is_empty() { field(0) } else { gpu };
        Header {
            gpu,
            driver: field(1),
            cuda,
            clocks: match smi {
                Some(_) => format!(
                    "SM {} (max {}), memory {} (max {})",
                    field(2),
                    field(3),
                    field(4),
                    field(5)
                ),
                None => field(2),
            },
            versions: format!(
                "mhc-train {}, candle-core {}, candle-nn {}, cudarc {}",
                env!("CARGO_PKG_VERSION"),
                locked_version("candle-core"),
                locked_version("candle-nn"),
                locked_version("cudarc"),
            ),
            date: utc_now(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

/// One `--query-gpu` line of GPU 0, split at commas; None when nvidia-smi cannot be run.
fn nvidia_smi(fields: &[&str]) -> Option<Vec<String>> {
    let output = std::process::Command::new("nvidia-smi")
        .arg(format!("--query-gpu={}", fields.join(",")))
        .args(["--format=csv,noheader", "--id=0"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&output.stdout);
    Some(
        line.trim()
            .split(',')
            .map(|s| s.trim().to_string())
            .collect(),
    )
}

/// The version Cargo.lock pins for `package` (the build used exactly these).
pub fn locked_version(package: &str) -> String {
    const LOCK: &str = include_str!("../../Cargo.lock");
    let name_line = format!("name = \"{package}\"");
    let mut lines = LOCK.lines();
    while let Some(line) = lines.next() {
        if line == name_line {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = ")) {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "unknown".into()
}

/// Now in UTC as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_date(secs)
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (Howard Hinnant's civil-from-days).
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86400) as i64;
    let rem = unix_secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One timed cell: the median device time and the peak memory during the calls, or why it
/// could not be measured (out of memory, say).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub ms: Option<f64>,
    /// Peak of the memory pool's bytes in use during the calls minus before the variant's
    /// inputs were made (so inputs, parameters, activations and gradients count).
    pub peak_bytes: Option<f64>,
    pub error: Option<String>,
}

impl Measurement {
    pub fn failed(error: impl std::fmt::Display) -> Measurement {
        Measurement {
            error: Some(error.to_string()),
            ..Measurement::default()
        }
    }
}

/// An isolated op (RMSNorm, sigmoid) on a rows x cols tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpTiming {
    pub op: String,
    pub rows: usize,
    pub cols: usize,
    /// One of `OP_VARIANTS`.
    pub variant: String,
    pub time: Measurement,
}

/// One mHC sublayer (F = RMSNorm) configuration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerConfig {
    pub tokens: usize,
    pub width: usize,
    pub streams: usize,
    pub dynamic: bool,
}

impl LayerConfig {
    fn label(&self) -> String {
        format!("T={}, n={}, C={}", self.tokens, self.streams, self.width)
    }

    fn mode(&self) -> &'static str {
        if self.dynamic {
            "dynamic"
        } else {
            "static"
        }
    }

    /// Bytes an ideal forward must move with `elem` bytes per stored element: 3X + 4U with
    /// X = T*n*C and U = T*C elements (see `crate::gpu::bench`).
    pub fn floor_fwd_bytes(&self, elem: usize) -> f64 {
        let (x, u) = self.elements(elem);
        3.0 * x + 4.0 * u
    }

    /// Bytes an ideal forward+backward must move: 9X + 10U.
    pub fn floor_fwd_bwd_bytes(&self, elem: usize) -> f64 {
        let (x, u) = self.elements(elem);
        9.0 * x + 10.0 * u
    }

    fn elements(&self, elem: usize) -> (f64, f64) {
        let u = (self.tokens * self.width * elem) as f64;
        (u * self.streams as f64, u)
    }
}

/// Which table a layer row belongs to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SizeSet {
    /// The seed report's B x C configs.
    Seed,
    /// Token counts of a training micro-batch.
    Training,
}

impl SizeSet {
    fn title(self) -> &'static str {
        match self {
            SizeSet::Seed => "the seed report's configs",
            SizeSet::Training => "training sizes",
        }
    }
}

/// One variant of one sublayer configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerTiming {
    pub set: SizeSet,
    pub config: LayerConfig,
    /// One of `LAYER_VARIANTS`.
    pub variant: String,
    /// Bytes per stored element of x (4 for f32, 2 for bf16).
    pub elem_bytes: usize,
    pub fwd: Measurement,
    pub fwd_bwd: Measurement,
}

/// max |d|, mean |d| and ||d|| / ||ref|| of d = fused - reference.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    pub max: f64,
    pub mean: f64,
    pub rel: f64,
}

impl Diff {
    /// From reductions over d = fused - reference: max |d|, sum |d|, sum d^2, sum ref^2 and
    /// the element count (a NaN anywhere gives NaN, never a pass).
    pub fn from_sums(max_abs: f64, sum_abs: f64, sum_sq: f64, ref_sum_sq: f64, n: usize) -> Diff {
        Diff {
            // A device max may skip NaNs; the sum cannot.
            max: if sum_abs.is_nan() { f64::NAN } else { max_abs },
            mean: sum_abs / n.max(1) as f64,
            rel: sum_sq.sqrt() / ref_sum_sq.sqrt(),
        }
    }
}

/// Fused bf16 against the candle-ops f32 reference on the same (bf16-representable) inputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Accuracy {
    pub set: SizeSet,
    pub config: LayerConfig,
    /// The sublayer output x'.
    pub out: Option<Diff>,
    /// The gradient of sum(x' * g) in x, g random.
    pub dx: Option<Diff>,
    pub error: Option<String>,
}

/// Everything the layer bench measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerResults {
    /// Which kernel the "fused" RMSNorm rows ran.
    pub fused_rms_norm: String,
    /// Device-to-device copy bandwidth, GB/s (read + write).
    pub copy_gbs: f64,
    pub warmup: usize,
    pub reps: usize,
    pub op_reps: usize,
    pub flush_bytes: usize,
    pub ops: Vec<OpTiming>,
    pub layers: Vec<LayerTiming>,
    pub accuracy: Vec<Accuracy>,
    /// Each fused op alone (Markdown table), for kernel work.
    pub fused_ops_alone: String,
}

/// The `--train` part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSection {
    pub config_path: String,
    pub overrides: Vec<String>,
    pub dtype: String,
    pub warmup: usize,
    pub steps: usize,
    pub config: serde_json::Value,
    pub results: Vec<TrainBench>,
}

/// bench.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub header: Header,
    pub layer: Option<LayerResults>,
    pub train: Option<TrainSection>,
}

impl Report {
    /// Writes bench.json, bench.md and (with layer results) speedup.png into `dir`; returns the
    /// Markdown.
    pub fn write(&self, dir: &Path) -> Result<String> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the bench folder {}", dir.display()))?;
        let md = self.markdown();
        crate::train::trainer::write_atomically(&dir.join("bench.md"), &md)?;
        crate::train::trainer::write_atomically(
            &dir.join("bench.json"),
            &serde_json::to_string_pretty(self)?,
        )?;
        if let Some(layer) = &self.layer {
            crate::bench::plot::speedup_png(&dir.join(SPEEDUP_PNG), &layer.layers)?;
        }
        Ok(md)
    }

    pub fn markdown(&self) -> String {
        let h = &self.header;
        let mut md = format!(
            "# mhc-train bench\n\n\
             - GPU: {}\n- driver: {}, CUDA (driver API) {}\n- clocks at start: {}\n\
             - versions: {}\n- date: {}\n- command: `{}`\n\n",
            h.gpu, h.driver, h.cuda, h.clocks, h.versions, h.date, h.command
        );
        if let Some(layer) = &self.layer {
            md += &layer_markdown(layer);
        }
        if let Some(t) = &self.train {
            md += &format!(
                "## Training steps\n\nconfig {} ({}), dtype {}, {} warm-up + {} timed steps per \
                 variant, each variant in its own process; step time is the host clock around \
                 one optimizer step (synchronised).\n\n",
                t.config_path,
                if t.overrides.is_empty() {
                    "no overrides".to_string()
                } else {
                    t.overrides.join(" ")
                },
                t.dtype,
                t.warmup,
                t.steps
            );
            md += &train::markdown(&t.results);
        }
        md
    }
}

/// File name of the speedup plot in the bench folder.
pub const SPEEDUP_PNG: &str = "speedup.png";

fn ms_cell(m: &Measurement) -> String {
    match (&m.ms, &m.error) {
        (Some(ms), _) => format!("{ms:.4}"),
        (None, Some(e)) => format!("failed: {}", e.replace('|', "/")),
        (None, None) => "-".into(),
    }
}

fn ratio_cell(slow: Option<f64>, fast: Option<f64>) -> String {
    match (slow, fast) {
        (Some(s), Some(f)) if f > 0.0 => format!("**{:.2}x**", s / f),
        _ => "-".into(),
    }
}

fn mib_cell(m: &Measurement) -> String {
    m.peak_bytes
        .map_or("-".into(), |b| format!("{:.1}", b / (1u64 << 20) as f64))
}

fn diff_cells(d: &Option<Diff>) -> String {
    d.map_or("- | - | -".into(), |d| {
        format!("{:.2e} | {:.2e} | {:.2e}", d.max, d.mean, d.rel)
    })
}

/// The configs in first-seen order (the table rows).
fn configs_of(layers: &[LayerTiming], set: SizeSet) -> Vec<LayerConfig> {
    let mut configs: Vec<LayerConfig> = Vec::new();
    for row in layers.iter().filter(|r| r.set == set) {
        if !configs.contains(&row.config) {
            configs.push(row.config);
        }
    }
    configs
}

fn find<'a>(layers: &'a [LayerTiming], c: &LayerConfig, variant: &str) -> Option<&'a LayerTiming> {
    layers
        .iter()
        .find(|r| r.config == *c && r.variant == variant)
}

fn layer_markdown(r: &LayerResults) -> String {
    let mut md = format!(
        "## Method\n\n\
         Device time between CUDA events around each call, {} warm-up calls, the L2 cache flushed \
         before every timed call (an in-place {} MiB memset), median of {} calls per layer cell \
         and {} per isolated-op cell. Inputs are random (normal), never zeros. Device-to-device \
         copy bandwidth (1 GiB, bytes read + written): **{:.0} GB/s**. Peak memory: the CUDA \
         memory pool's high-water mark of bytes in use during the variant's calls minus the bytes \
         in use before its inputs were made (inputs, parameters, activations and gradients \
         count; the pool is trimmed between variants). Sinkhorn iterations 20. Layer variants: \
         candle-ops = `mhc::reference` coeffs, pre and post with F as candle basic ops, autograd \
         backward; fused = the trainer's path, the chained fused sublayer `mhc::ops::sublayer` \
         (backward writes dx once) with F = the fused RMSNorm `mhc::apply::rms_norm`, candle's \
         autograd around it.\n\n",
        r.warmup,
        r.flush_bytes >> 20,
        r.reps,
        r.op_reps,
        r.copy_gbs
    );
    md += &ops_markdown(r);
    for set in [SizeSet::Seed, SizeSet::Training] {
        let configs = configs_of(&r.layers, set);
        if configs.is_empty() {
            continue;
        }
        for (pass, title) in [(false, "Forward"), (true, "Forward + backward")] {
            md += &format!(
                "## Full mHC layer (F = RMSNorm), {}: {title}\n\n\
                 Times in ms. Floor: the fewest bytes an ideal implementation moves, {} with \
                 X = T*n*C and U = T*C elements of 2 bytes (bf16); GB/s = floor / time; % = that \
                 over the copy bandwidth.\n\n\
                 | Config | mode | {REF_F32} | {REF_BF16} | {FUSED_BF16} | speedup vs f32 | \
                 speedup vs bf16 | floor MB | fused GB/s | % of copy |\n\
                 |---|---|---|---|---|---|---|---|---|---|\n",
                set.title(),
                if pass { "9X + 10U" } else { "3X + 4U" }
            );
            for c in &configs {
                let get =
                    |v: &str| find(&r.layers, c, v).map(|t| if pass { &t.fwd_bwd } else { &t.fwd });
                let ms = |v: &str| get(v).and_then(|m| m.ms);
                let cell = |v: &str| get(v).map_or("-".into(), ms_cell);
                let floor = if pass {
                    c.floor_fwd_bwd_bytes(2)
                } else {
                    c.floor_fwd_bytes(2)
                };
                let (gbs, pct) = ms(FUSED_BF16).map_or(("-".into(), "-".into()), |ms| {
                    let gbs = floor / (ms * 1e-3) / 1e9;
                    (
                        format!("{gbs:.0}"),
                        format!("{:.0}%", 100.0 * gbs / r.copy_gbs),
                    )
                });
                md += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {gbs} | {pct} |\n",
                    c.label(),
                    c.mode(),
                    cell(REF_F32),
                    cell(REF_BF16),
                    cell(FUSED_BF16),
                    ratio_cell(ms(REF_F32), ms(FUSED_BF16)),
                    ratio_cell(ms(REF_BF16), ms(FUSED_BF16)),
                    floor / 1e6,
                );
            }
            md += "\n";
        }
    }
    md += &target_line(r);
    md += &memory_markdown(r);
    md += &accuracy_markdown(r);
    if !r.fused_ops_alone.is_empty() {
        md += "## Fused mHC ops alone\n\n";
        md += &r.fused_ops_alone;
        md += "\n";
    }
    md += &format!("![speedups]({SPEEDUP_PNG})\n\n");
    md
}

/// Whether the seed configs meet the forward+backward speedup target.
fn target_line(r: &LayerResults) -> String {
    let mut worst: Option<(f64, LayerConfig)> = None;
    let mut missing = 0;
    for c in configs_of(&r.layers, SizeSet::Seed) {
        let ms = |v: &str| find(&r.layers, &c, v).and_then(|t| t.fwd_bwd.ms);
        match (ms(REF_F32), ms(FUSED_BF16)) {
            (Some(slow), Some(fast)) => {
                let s = slow / fast;
                if worst.is_none_or(|(w, _)| s < w) {
                    worst = Some((s, c));
                }
            }
            _ => missing += 1,
        }
    }
    match worst {
        None => String::new(),
        Some((s, c)) => format!(
            "**Target** (fused bf16 forward+backward >= {TARGET_SPEEDUP:.0}x candle-ops f32 at \
             every seed config): {}; smallest speedup {s:.2}x at {} {}{}.\n\n",
            if s >= TARGET_SPEEDUP && missing == 0 {
                "met"
            } else {
                "NOT met"
            },
            c.label(),
            c.mode(),
            if missing > 0 {
                format!(", {missing} configs without both numbers")
            } else {
                String::new()
            }
        ),
    }
}

fn ops_markdown(r: &LayerResults) -> String {
    let mut md = String::new();
    let mut ops: Vec<&str> = Vec::new();
    for t in &r.ops {
        if !ops.contains(&t.op.as_str()) {
            ops.push(&t.op);
        }
    }
    for op in ops {
        let note = if op == "rmsnorm" {
            format!(
                "candle ops: upcast to f32, mean of squares, sqrt, divide, scale, cast back (the \
                 F of the candle-ops sublayer variants); fused: {}.",
                r.fused_rms_norm
            )
        } else {
            "candle ops: 1 / (1 + exp(-x)) as three candle ops; fused: `candle_nn::ops::sigmoid` \
             (one kernel)."
                .to_string()
        };
        md += &format!(
            "## Isolated op: {op} (forward)\n\n{note} Times in ms.\n\n\
             | Size | {} | speedup f32 | speedup bf16 | **fused bf16 vs candle-ops f32** |\n\
             |---|---|---|---|---|---|---|---|\n",
            OP_VARIANTS.join(" | ")
        );
        let mut sizes: Vec<(usize, usize)> = Vec::new();
        for t in r.ops.iter().filter(|t| t.op == op) {
            if !sizes.contains(&(t.rows, t.cols)) {
                sizes.push((t.rows, t.cols));
            }
        }
        for (rows, cols) in sizes {
            let get = |v: &str| {
                r.ops
                    .iter()
                    .find(|t| t.op == op && t.rows == rows && t.cols == cols && t.variant == v)
            };
            let ms = |v: &str| get(v).and_then(|t| t.time.ms);
            let cells: Vec<String> = OP_VARIANTS
                .iter()
                .map(|v| get(v).map_or("-".into(), |t| ms_cell(&t.time)))
                .collect();
            md += &format!(
                "| ({rows}, {cols}) | {} | {} | {} | {} |\n",
                cells.join(" | "),
                ratio_cell(ms(REF_F32), ms(FUSED_F32)),
                ratio_cell(ms(REF_BF16), ms(FUSED_BF16)),
                ratio_cell(ms(REF_F32), ms(FUSED_BF16)),
            );
        }
        md += "\n";
    }
    md
}

fn memory_markdown(r: &LayerResults) -> String {
    let mut md = String::from(
        "## Peak memory (MiB)\n\n\
         | Config | mode | f32 ops fwd | f32 ops fwd+bwd | bf16 ops fwd | bf16 ops fwd+bwd | fused fwd | fused fwd+bwd |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for set in [SizeSet::Seed, SizeSet::Training] {
        for c in configs_of(&r.layers, set) {
            let cells: Vec<String> = LAYER_VARIANTS
                .iter()
                .map(|v| {
                    find(&r.layers, &c, v).map_or("- | -".into(), |t| {
                        format!("{} | {}", mib_cell(&t.fwd), mib_cell(&t.fwd_bwd))
                    })
                })
                .collect();
            md += &format!("| {} | {} | {} |\n", c.label(), c.mode(), cells.join(" | "));
        }
    }
    md + "\n"
}

fn accuracy_markdown(r: &LayerResults) -> String {
    let mut md = String::from(
        "## Correctness: fused bf16 vs candle-ops f32 reference\n\n\
         Same inputs (random bf16 values, the reference computes in f32 on them). x' = the \
         sublayer output; dx = gradient of sum(x' * g) in x for a random g. Relative = \
         ||fused - ref|| / ||ref||.\n\n\
         | Config | mode | x' max | x' mean | x' relative | dx max | dx mean | dx relative |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for a in &r.accuracy {
        match &a.error {
            Some(e) => {
                md += &format!(
                    "| {} | {} | failed: {} | | | | | |\n",
                    a.config.label(),
                    a.config.mode(),
                    e.replace('|', "/")
                )
            }
            None => {
                md += &format!(
                    "| {} | {} | {} | {} |\n",
                    a.config.label(),
                    a.config.mode(),
                    diff_cells(&a.out),
                    diff_cells(&a.dx)
                )
            }
        }
    }
    md + "\n"
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Synthetic results: every variant of every config, fused `speedup` times faster than
    /// f32 ops, with one failed cell.
    pub(crate) fn synthetic(speedup: f64) -> LayerResults {
        let mut layers = Vec::new();
        let mut accuracy = Vec::new();
        for (set, tokens) in [
            (SizeSet::Seed, 128),
            (SizeSet::Seed, 1024),
            (SizeSet::Training, 16384),
        ] {
            for dynamic in [true, false] {
                let config = LayerConfig {
                    tokens,
                    width: 1280,
                    streams: 4,
                    dynamic,
                };
                for (i, variant) in LAYER_VARIANTS.iter().enumerate() {
                    let ms = if *variant == FUSED_BF16 {
                        1.0 / speedup
                    } else {
                        1.0 + i as f64
                    };
                    let m = |scale: f64| Measurement {
                        ms: Some(ms * scale),
                        peak_bytes: Some(scale * 1e6 * (1 + i) as f64),
                        error: None,
                    };
                    layers.push(LayerTiming {
                        set,
                        config,
                        variant: variant.to_string(),
                        elem_bytes: if *variant == REF_F32 { 4 } else { 2 },
                        fwd: m(1.0),
                        fwd_bwd: m(3.0),
                    });
                }
                let d = Diff {
                    max: 2e-2,
                    mean: 1e-3,
                    rel: 3e-3,
                };
                accuracy.push(Accuracy {
                    set,
                    config,
                    out: Some(d),
                    dx: Some(d),
                    error: None,
                });
            }
        }
        let mut ops = Vec::new();
        for op in ["rmsnorm", "sigmoid"] {
            for (rows, cols) in [(256, 1280), (2048, 4096)] {
                for (i, variant) in OP_VARIANTS.iter().enumerate() {
                    ops.push(OpTiming {
                        op: op.into(),
                        rows,
                        cols,
                        variant: variant.to_string(),
                        time: if op == "sigmoid" && rows == 2048 && *variant == FUSED_F32 {
                            Measurement::failed("out of memory")
                        } else {
                            Measurement {
                                ms: Some(0.01 * (4 - i) as f64),
                                ..Measurement::default()
                            }
                        },
                    });
                }
            }
        }
        LayerResults {
            fused_rms_norm: "candle_nn::ops::rms_norm".into(),
            copy_gbs: 3000.0,
            warmup: 2,
            reps: 20,
            op_reps: 100,
            flush_bytes: 256 << 20,
            ops,
            layers,
            accuracy,
            fused_ops_alone: String::new(),
        }
    }

    fn header() -> Header {
        Header {
            gpu: "test GPU".into(),
            driver: "1.0".into(),
            cuda: "13.0".into(),
            clocks: "SM 1 MHz".into(),
            versions: "v".into(),
            date: utc_date(0),
            command: "mhc-train bench".into(),
        }
    }

    #[test]
    fn utc_date_matches_known_instants() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        // 2000-02-29 12:34:56 UTC = 951827696 (leap day of a century leap year).
        assert_eq!(utc_date(951_827_696), "2000-02-29 12:34:56 UTC");
        assert_eq!(utc_date(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }

    #[test]
    fn locked_versions_come_from_cargo_lock() {
        assert_eq!(locked_version("candle-core"), "0.11.1");
        assert_eq!(locked_version("no-such-package"), "unknown");
    }

    #[test]
    fn diff_by_hand() {
        // fused [1, 2, 3.5] vs reference [1, 2.5, 3]: d = [0, -0.5, 0.5].
        let d = Diff::from_sums(0.5, 1.0, 0.5, 1.0 + 6.25 + 9.0, 3);
        assert_eq!(d.max, 0.5);
        assert!((d.mean - 1.0 / 3.0).abs() < 1e-12);
        let rel = (0.5f64).sqrt() / (1.0f64 + 6.25 + 9.0).sqrt();
        assert!((d.rel - rel).abs() < 1e-12);
    }

    #[test]
    fn floors_by_hand() {
        let c = LayerConfig {
            tokens: 10,
            width: 3,
            streams: 4,
            dynamic: true,
        };
        // X = 120, U = 30 elements of 2 bytes.
        assert_eq!(c.floor_fwd_bytes(2), (3.0 * 120.0 + 4.0 * 30.0) * 2.0);
        assert_eq!(c.floor_fwd_bwd_bytes(2), (9.0 * 120.0 + 10.0 * 30.0) * 2.0);
    }

    #[test]
    fn markdown_has_every_row_and_speedup() {
        let report = Report {
            header: header(),
            layer: Some(synthetic(25.0)),
            train: None,
        };
        let md = report.markdown();
        for needle in ["test GPU", "## Method", "3000 GB/s", "1970-01-01"] {
            assert!(md.contains(needle), "missing {needle:?}");
        }
        for label in [
            "T=128, n=4, C=1280",
            "T=1024, n=4, C=1280",
            "T=16384, n=4, C=1280",
        ] {
            for mode in ["dynamic", "static"] {
                let row = format!("| {label} | {mode} |");
                // Forward and fwd+bwd tables, memory, correctness.
                assert_eq!(md.matches(&row).count(), 4, "rows of {row}");
            }
        }
        // f32 ops 1 ms fwd+bwd 3 ms vs fused 0.04 / 0.12 ms: 25x in both passes.
        assert!(md.contains("**25.00x**"));
        assert!(md.contains("**Target**") && md.contains(": met;"));
        // Isolated ops: 2 sizes per op, the failed cell named.
        assert_eq!(md.matches("| (256, 1280) |").count(), 2);
        assert_eq!(md.matches("| (2048, 4096) |").count(), 2);
        assert!(md.contains("failed: out of memory"));
        // fused bf16 0.01 ms vs f32 ops 0.04 ms.
        assert!(md.contains("| **4.00x** |\n"));
        // Memory of the fused fwd+bwd of the first config: 3 * 1e6 * 3 bytes.
        assert!(md.contains(&format!("{:.1} |\n", 9e6 / (1u64 << 20) as f64)));
        let slow = Report {
            header: header(),
            layer: Some(synthetic(5.0)),
            train: None,
        };
        assert!(slow.markdown().contains("NOT met"));
    }

    #[test]
    fn write_produces_json_markdown_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let report = Report {
            header: header(),
            layer: Some(synthetic(25.0)),
            train: None,
        };
        let md = report.write(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bench.md")).unwrap(),
            md
        );
        let json: Report =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).unwrap())
                .unwrap();
        assert_eq!(json.layer.unwrap().layers, report.layer.unwrap().layers);
        assert!(dir.path().join(SPEEDUP_PNG).exists());
    }
}
