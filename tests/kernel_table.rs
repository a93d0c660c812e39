//! The kernel table (src/gpu/mod.rs) against the kernel sources, without a GPU: every symbol of
//! every family in `KERNELS` (each storage dtype, each stream count) is an
//! exported kernel of its module's `kernels/<stem>.cu`, with the table's argument list: names in
//! order, `const` pointers for `In`, writable pointers for `Out`/`Accumulate`, f32 pointers for
//! `F32`, the dtype's storage pointer for `Storage`, `long long` for `I64`, `int` for `I32`.
//! Also the launch rules of the RMSNorm kernels, the coefficient projection and the coefficient
//! backward over x, and the row layout of the coefficient backward's dp scratch.

use candle_core::DType;
use mhc_train::gpu::{
    bwd_row_len, bwd_x_on_tensor_cores, bwd_x_resident_blocks, project_resident_blocks, Arg,
    DeviceLimits, Elem, ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR, ACCUMULATE_ROWS_PER_BLOCK,
    BWD_X_ELEMS_PER_THREAD, BWD_X_TOKEN_CHUNK, COEFFS_BWD_X_SUM, COEFFS_FINISH, COEFFS_PROJECT,
    DGAMMA_SUM_COLUMNS, FINISH_TOKENS, KERNELS, MAX_STREAMS, MIN_STREAMS, PRE_NORM_BWD,
    PRE_NORM_FWD, PROJECT_CHUNK, PROJECT_TOKENS, RMS_NORM_BWD, RMS_NORM_DGAMMA_SUM, RMS_NORM_FWD,
};
use mhc_train::mhc::MhcShape;
use std::collections::HashMap;

/// One parameter as declared: (name, C type text without the name).
type Param = (String, String);

/// kernel name -> parameters, from `extern "C" __global__ void NAME(MACRO(TYPE)) {` lines and the
/// `#define MACRO(T) ...` (possibly `\`-continued) parameter macros of one source.
fn exported_kernels(src: &str) -> HashMap<String, Vec<Param>> {
    let joined = src.replace("\\\n", " ");
    let mut macros: HashMap<String, (Option<String>, String)> = HashMap::new();
    for line in joined.lines() {
        let Some(rest) = line.trim().strip_prefix("#define ") else {
            continue;
        };
        let name_end = rest.find([' ', '(']).unwrap_or(rest.len());
        let name = rest[..name_end].to_string();
        let rest = &rest[name_end..];
        let (param, body) = match rest.strip_prefix('(') {
            Some(r) => {
                let close = r.find(')').unwrap();
                (Some(r[..close].trim().to_string()), r[close + 1..].trim())
            }
            None => (None, rest.trim()),
        };
        macros.insert(name, (param, body.to_string()));
    }
    let mut kernels = HashMap::new();
    for line in joined.lines() {
        let Some(rest) = line.trim().strip_prefix("extern \"C\" __global__ void ") else {
            continue;
        };
        // An occupancy hint between the return type and the name: `__launch_bounds__(..) `.
        let rest = match rest.strip_prefix("__launch_bounds__(") {
            Some(bounds) => bounds[bounds.find(") ").unwrap() + 2..].trim_start(),
            None => rest,
        };
        let open = rest.find('(').unwrap();
        let name = rest[..open].to_string();
        let inner = &rest[open + 1..rest.find(") {").unwrap()];
        let params_text = match inner.find('(') {
            Some(p) => {
                let (macro_name, arg) = (&inner[..p], &inner[p + 1..inner.len() - 1]);
                let (param, body) = &macros[macro_name];
                replace_word(body, param.as_deref().unwrap(), arg)
            }
            None => macros.get(inner).map_or(inner.to_string(), |m| m.1.clone()),
        };
        let params = params_text
            .split(',')
            .map(|p| {
                let p = p.trim();
                let split = p
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap();
                (p[split + 1..].to_string(), p[..=split].trim().to_string())
            })
            .collect();
        kernels.insert(name, params);
    }
    kernels
}

/// `text` with every whole identifier `word` replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::new();
    let mut token = String::new();
    for ch in text.chars().chain(std::iter::once('\n')) {
        if ch.is_alphanumeric() || ch == '_' {
            token.push(ch);
        } else {
            out.push_str(if token == word { with } else { &token });
            token.clear();
            out.push(ch);
        }
    }
    out.pop();
    out
}

/// The C type the table's argument has for storage `dtype`.
fn expected_type(arg: &Arg, dtype: DType) -> (String, String) {
    let elem = |e: &Elem| match (e, dtype) {
        (Elem::F32, _) | (Elem::Storage, DType::F32) => "float",
        (Elem::Storage, _) => "mhc_bf16",
    };
    match arg {
        Arg::In(name, e) => (name.to_string(), format!("const {} *", elem(e))),
        Arg::Out(name, e) | Arg::Accumulate(name, e) => {
            (name.to_string(), format!("{} *", elem(e)))
        }
        Arg::I64(name) => (name.to_string(), "long long".into()),
        Arg::I32(name) => (name.to_string(), "int".into()),
    }
}

#[test]
fn every_table_kernel_is_exported_with_the_table_arguments() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut sources = HashMap::new();
    let mut checked = 0usize;
    for spec in KERNELS {
        let stem = spec.module.stem();
        let kernels = sources.entry(stem).or_insert_with(|| {
            exported_kernels(&std::fs::read_to_string(format!("{root}/kernels/{stem}.cu")).unwrap())
        });
        let dtypes: &[DType] = if spec.per_dtype {
            &[DType::F32, DType::BF16]
        } else {
            &[DType::F32]
        };
        let streams: Vec<usize> = if spec.per_streams {
            (MIN_STREAMS..=MAX_STREAMS).collect()
        } else {
            vec![0]
        };
        for &dtype in dtypes {
            for &n in &streams {
                let symbol = spec.symbol(dtype, n).unwrap();
                let params = kernels
                    .get(&symbol)
                    .unwrap_or_else(|| panic!("{symbol} is not exported by kernels/{stem}.cu"));
                let want: Vec<(String, String)> =
                    spec.args.iter().map(|a| expected_type(a, dtype)).collect();
                assert_eq!(
                    params, &want,
                    "{symbol}: declared parameters differ from the table"
                );
                checked += 1;
            }
        }
    }
    // 6 mHC families of 14 symbols (2 dtypes x 7 n), 3 of 7 (n only: static, finish, per-token
    // backward), the RMSNorm pair (2 dtypes each) and its dgamma sum (one), the 3 chained
    // families of 14 (coefficient backward summing dx, pre backward without dx, pre backward
    // adding post's dx), and pre with the RMSNorm fused, 2 families of 14, with pre's dx sum
    // beside it for static mode (no dh), 14.
    assert_eq!(checked, 6 * 14 + 3 * 7 + 2 * 2 + 1 + 3 * 14 + 2 * 14 + 14);
}

#[test]
fn rms_norm_launch_rules() {
    let limits = DeviceLimits {
        wave: 32,
        multiprocessors: 132,
        tensor_cores: true,
    };
    // C = 1280 bf16: 160 chunks of 8 -> a 160-thread block per row.
    let fwd = RMS_NORM_FWD.row_geometry(&limits, DType::BF16, 16384, 1280);
    assert_eq!(fwd.block, 160);
    // Grid-stride: at most BLOCKS_PER_MULTIPROCESSOR (32) blocks per multiprocessor.
    assert_eq!(fwd.grid, (32 * 132, 1));
    // The backward's grid holds the threads of ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR (4) full
    // blocks per multiprocessor: 4 * 256 / 160 -> 6 blocks of 160 (960 threads, 64 registers
    // each: within the 65536 of a multiprocessor), 4 blocks of 256.
    let bwd = RMS_NORM_BWD.row_geometry(&limits, DType::BF16, 16384, 1280);
    assert_eq!(bwd.block, 160);
    assert_eq!(ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR, 4);
    assert_eq!(bwd.grid, (6 * 132, 1));
    let wide = RMS_NORM_BWD.row_geometry(&limits, DType::BF16, 16384, 4096);
    assert_eq!(wide.block, 256);
    assert_eq!(wide.grid, (4 * 132, 1));
    // Fewer rows than the cap: one block per pair of rows (ACCUMULATE_ROWS_PER_BLOCK). Wide f32
    // rows: the block is capped at 256.
    assert_eq!(ACCUMULATE_ROWS_PER_BLOCK, 2);
    assert_eq!(
        RMS_NORM_BWD.row_geometry(&limits, DType::F32, 5, 9000).grid,
        (3, 1)
    );
    assert_eq!(
        RMS_NORM_BWD
            .row_geometry(&limits, DType::BF16, 1024, 2560)
            .grid,
        (512, 1)
    );
    assert_eq!(
        RMS_NORM_FWD
            .row_geometry(&limits, DType::F32, 5, 9000)
            .block,
        256
    );
    // The dgamma sum: a block per DGAMMA_SUM_COLUMNS columns, the last one partial.
    let sum = RMS_NORM_DGAMMA_SUM.row_geometry(&limits, DType::F32, 1056, 1283);
    assert_eq!(sum.block, 256);
    assert_eq!(sum.grid, (1283_u32.div_ceil(DGAMMA_SUM_COLUMNS as u32), 1));
    // AMD waves of 64: blocks are whole waves.
    let amd = DeviceLimits {
        wave: 64,
        multiprocessors: 304,
        tensor_cores: false,
    };
    assert_eq!(
        RMS_NORM_FWD.row_geometry(&amd, DType::BF16, 7, 1280).block,
        192
    );
    assert_eq!(
        RMS_NORM_FWD.symbol(DType::BF16, 0).unwrap(),
        "rms_norm_fwd_bf16"
    );
}

#[test]
fn pre_norm_launch_rules() {
    let limits = DeviceLimits {
        wave: 32,
        multiprocessors: 132,
        tensor_cores: true,
    };
    let shape = |streams, width| MhcShape {
        streams,
        width,
        sinkhorn_iters: 20,
        dynamic: true,
    };
    // n = 4, C = 1280 bf16: 16-byte chunks of 8 -> 160 threads per token row, as the RMSNorm's;
    // n = 8 takes 8-byte chunks (its 8 rows of x live in registers at once): 320 -> 256.
    let fwd = PRE_NORM_FWD.geometry(&limits, &shape(4, 1280), DType::BF16, 16384);
    assert_eq!((fwd.block, fwd.grid), (160, (32 * 132, 1)));
    let wide = PRE_NORM_FWD.geometry(&limits, &shape(8, 1280), DType::BF16, 16384);
    assert_eq!(wide.block, 256);
    // The backward's grid: six 160-thread blocks per multiprocessor at T = 16384 (the dgamma
    // partial rows it writes: 792 x C), a block per two tokens at T = 1024.
    let bwd = PRE_NORM_BWD.geometry(&limits, &shape(4, 1280), DType::BF16, 16384);
    assert_eq!((bwd.block, bwd.grid), (160, (6 * 132, 1)));
    let short = PRE_NORM_BWD.geometry(&limits, &shape(4, 1280), DType::BF16, 1024);
    assert_eq!(short.grid, (512, 1));
}

#[test]
fn projection_slices_cover_d_and_fill_one_wave() {
    let limits = DeviceLimits {
        wave: 32,
        multiprocessors: 132,
        tensor_cores: true,
    };
    for (tokens, streams, width) in [
        (16384, 4, 1280),
        (1024, 4, 1280),
        (128, 4, 2560),
        (1, 4, 1280),
        (5, 2, 7),
        (64, 8, 33),
        (100_000, 4, 1280),
    ] {
        let shape = MhcShape {
            streams,
            width,
            sinkhorn_iters: 20,
            dynamic: true,
        };
        let d = streams * width;
        let resident = project_resident_blocks(streams) * 132;
        let g = COEFFS_PROJECT.geometry(&limits, &shape, DType::BF16, tokens);
        let (tiles, slices) = (g.grid.0 as usize, g.grid.1 as usize);
        let case = format!("T={tokens} n={streams} C={width}: {g:?}");
        assert_eq!(g.block, 128, "{case}");
        assert_eq!(tiles, tokens.div_ceil(PROJECT_TOKENS), "{case}");
        // The finish step: one block per tile of FINISH_TOKENS tokens, every token covered.
        let finish = COEFFS_FINISH.geometry(&limits, &shape, DType::BF16, tokens);
        assert_eq!(
            finish.grid,
            (tokens.div_ceil(FINISH_TOKENS) as u32, 1),
            "{case}"
        );
        // Slices are whole chunks, cover D, and none is empty.
        assert_eq!(g.split_len % PROJECT_CHUNK, 0, "{case}");
        assert!(slices * g.split_len >= d, "{case}");
        assert!((slices - 1) * g.split_len < d, "{case}");
        // Split only within one wave of resident blocks, and far enough to fill most of it
        // unless D has no more chunks to split into (rounding slices up to whole chunks at most
        // halves the count).
        if slices > 1 {
            assert!(tiles * slices <= resident, "{case}");
        }
        if slices < d.div_ceil(PROJECT_CHUNK) && tiles < resident {
            assert!(2 * tiles * (slices + 1) > resident, "{case}");
        }
    }
}

#[test]
fn backward_token_ranges_fill_one_wave() {
    for (multiprocessors, wave) in [(132, 32), (304, 64)] {
        let limits = DeviceLimits {
            wave,
            multiprocessors,
            tensor_cores: wave == 32,
        };
        for ((tokens, streams, width), dtype) in [
            (16384, 4, 1280),
            (1024, 4, 2560),
            (65536, 4, 2560),
            (1, 4, 1280),
            (40, 2, 7),
            (4096, 8, 1032),
        ]
        .into_iter()
        .flat_map(|case| [(case, DType::BF16), (case, DType::F32)])
        {
            let shape = MhcShape {
                streams,
                width,
                sinkhorn_iters: 20,
                dynamic: true,
            };
            let g = COEFFS_BWD_X_SUM.geometry(&limits, &shape, dtype, tokens);
            let case =
                format!("T={tokens} n={streams} C={width} {dtype:?} on {multiprocessors}: {g:?}");
            let (d_blocks, ranges) = (g.grid.0 as usize, g.grid.1 as usize);
            // The tensor-core form (NVIDIA, bf16, n <= 4) owns a 16-column tile per warp (128
            // columns per block of 256) and stages x, dx_post and du: 3 stages of 16 rows of
            // 128 + 8 bf16 each, 39168 bytes; the FFMA form a column per thread, no staging.
            let tensor_core_form = wave == 32 && dtype == DType::BF16 && streams <= 4;
            let columns = if tensor_core_form {
                128
            } else {
                g.block as usize * BWD_X_ELEMS_PER_THREAD
            };
            assert_eq!(d_blocks, (streams * width).div_ceil(columns), "{case}");
            assert_eq!(
                g.shared_bytes,
                if tensor_core_form {
                    3 * 3 * 16 * 136 * 2
                } else {
                    0
                },
                "{case}"
            );
            // The working blocks (the kernel's work_blocks argument) are the first `work` of the
            // grid in order, x fastest: every column block has at least one, no grid row is
            // wholly idle, and column block cb has ceil((work - cb) / d_blocks) equal token
            // ranges, which differ by at most one between column blocks.
            let work = g.split_len;
            assert!(work >= d_blocks, "{case}");
            assert!(
                work <= d_blocks * ranges && work > d_blocks * (ranges - 1),
                "{case}"
            );
            let ranges_of = |cb: usize| (0..ranges).filter(|y| y * d_blocks + cb < work).count();
            assert_eq!(ranges_of(0), ranges, "{case}");
            assert!(ranges_of(d_blocks - 1) + 1 >= ranges, "{case}");
            // No range much shorter than the chunk: at most ceil(T / BWD_X_TOKEN_CHUNK) of them.
            assert!(ranges <= tokens.div_ceil(BWD_X_TOKEN_CHUNK), "{case}");
            // One wave of resident blocks (the kernels' register budgets: 3 blocks per
            // multiprocessor for n <= 4, 1 above), all of it used unless the tokens ran out (or
            // one range per column block already exceeds it).
            let per_multiprocessor = if streams <= 4 { 3 } else { 1 };
            assert_eq!(bwd_x_resident_blocks(streams), per_multiprocessor, "{case}");
            let resident = per_multiprocessor * multiprocessors;
            if d_blocks <= resident {
                assert!(work <= resident, "{case}");
                assert!(
                    work == resident || work == d_blocks * tokens.div_ceil(BWD_X_TOKEN_CHUNK),
                    "{case}"
                );
            } else {
                assert_eq!(work, d_blocks, "{case}");
            }
        }
    }
}

#[test]
fn dp_rows_match_the_pass_over_x() {
    // The per-token backward writes dp rows in the layout its reader takes (BwdRow in
    // kernels/mhc_coeffs.cu), hand-counted here in floats:
    // - tensor-core pass (bf16, n <= 4, NVIDIA): dP hi and lo as bf16, each padded to 16-wide
    //   k tiles (2 bytes x 16 KT each: 8 KT floats), then coef and 3 zeros: 16 KT + 4;
    // - FFMA pass: dP and coef in f32, k + 1 rounded up to 4.
    let nvidia = DeviceLimits {
        wave: 32,
        multiprocessors: 132,
        tensor_cores: true,
    };
    let amd = DeviceLimits {
        wave: 64,
        multiprocessors: 304,
        tensor_cores: false,
    };
    for (limits, streams, dtype, floats) in [
        (&nvidia, 2, DType::BF16, 20), // k = 8: one k tile
        (&nvidia, 3, DType::BF16, 20), // k = 15: one k tile
        (&nvidia, 4, DType::BF16, 36), // k = 24: two k tiles
        (&nvidia, 4, DType::F32, 28),  // k + 1 = 25 -> 28
        (&nvidia, 5, DType::BF16, 36), // k = 35 > 32: FFMA pass, 36 -> 36
        (&nvidia, 8, DType::BF16, 84), // k = 80: FFMA pass, 81 -> 84
        (&amd, 4, DType::BF16, 28),    // no tensor cores on AMD
        (&amd, 2, DType::F32, 12),     // k + 1 = 9 -> 12
    ] {
        let case = format!("n={streams} {dtype:?} tensor cores {}", limits.tensor_cores);
        assert_eq!(bwd_row_len(limits, streams, dtype), floats, "{case}");
        // Rows stay 16-byte aligned for the vector copies that stage them.
        assert_eq!(floats % 4, 0, "{case}");
        assert_eq!(
            bwd_x_on_tensor_cores(limits, streams, dtype),
            limits.tensor_cores && dtype == DType::BF16 && streams <= 4,
            "{case}"
        );
    }
}
