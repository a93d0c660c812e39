//! The AMD (HIP) path without an AMD GPU:
//! - both launch layers (src/gpu/{mhc,chain,pre_norm,rms_norm}.rs for CUDA,
//!   src/hip/{mhc,pre_norm,rms_norm}.rs for HIP) pass every kernel the argument list of the one
//!   table in src/gpu/mod.rs, in order, writable exactly where the table says the kernel writes,
//!   and both launch every kernel of the table (read from the sources; runs in every build);
//! - with `--features hip`: every embedded gfx942/gfx90a code object holds every kernel of the
//!   table with exactly the argument layout the HIP layer packs (AMD kernel metadata via
//!   llvm-readelf-19); the packer refuses arguments the table does not list; with no AMD GPU,
//!   the entry points fail with one clear message.

use mhc_train::gpu::{
    Arg, KernelSpec, COEFFS_BWD_TOKEN, COEFFS_BWD_X, COEFFS_BWD_X_SUM, COEFFS_FINISH,
    COEFFS_PROJECT, COEFFS_STATIC, KERNELS, POST_BWD, POST_FWD, PRE_BWD, PRE_BWD_DH,
    PRE_BWD_DX_SUM, PRE_BWD_SUM, PRE_FWD, PRE_NORM_BWD, PRE_NORM_FWD, RMS_NORM_BWD,
    RMS_NORM_DGAMMA_SUM, RMS_NORM_FWD,
};

/// The table's constants by name, as the launch layers spell them.
const SPECS: [(&str, KernelSpec); 18] = [
    ("COEFFS_STATIC", COEFFS_STATIC),
    ("COEFFS_PROJECT", COEFFS_PROJECT),
    ("COEFFS_FINISH", COEFFS_FINISH),
    ("COEFFS_BWD_TOKEN", COEFFS_BWD_TOKEN),
    ("COEFFS_BWD_X", COEFFS_BWD_X),
    ("COEFFS_BWD_X_SUM", COEFFS_BWD_X_SUM),
    ("PRE_FWD", PRE_FWD),
    ("PRE_BWD", PRE_BWD),
    ("PRE_BWD_DH", PRE_BWD_DH),
    ("PRE_BWD_SUM", PRE_BWD_SUM),
    ("PRE_BWD_DX_SUM", PRE_BWD_DX_SUM),
    ("POST_FWD", POST_FWD),
    ("POST_BWD", POST_BWD),
    ("PRE_NORM_FWD", PRE_NORM_FWD),
    ("PRE_NORM_BWD", PRE_NORM_BWD),
    ("RMS_NORM_FWD", RMS_NORM_FWD),
    ("RMS_NORM_BWD", RMS_NORM_BWD),
    ("RMS_NORM_DGAMMA_SUM", RMS_NORM_DGAMMA_SUM),
];

/// A parsed launch: the table constant's name and the (argument name, writable) list.
type Launch = (String, Vec<(String, bool)>);

/// The launch layers' source files, relative to the crate root.
const CUDA_LAYER: [&str; 4] = [
    "src/gpu/mhc.rs",
    "src/gpu/chain.rs",
    "src/gpu/pre_norm.rs",
    "src/gpu/rms_norm.rs",
];
const HIP_LAYER: [&str; 3] = [
    "src/hip/mhc.rs",
    "src/hip/pre_norm.rs",
    "src/hip/rms_norm.rs",
];

/// Every launch of a layer's files, by `parse`.
fn layer_launches(files: &[&str], parse: fn(&str) -> Vec<Launch>) -> Vec<Launch> {
    let root = env!("CARGO_MANIFEST_DIR");
    files
        .iter()
        .flat_map(|file| parse(&std::fs::read_to_string(format!("{root}/{file}")).unwrap()))
        .collect()
}

fn spec_named(name: &str) -> KernelSpec {
    SPECS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} is launched but not listed in tests/hip.rs SPECS"))
        .1
}

/// (name, writable) of the table's arguments; names lowercased.
fn table_args(spec: &KernelSpec) -> Vec<(String, bool)> {
    spec.args
        .iter()
        .map(|arg| match arg {
            Arg::In(name, _) => (name.to_lowercase(), false),
            Arg::Out(name, _) | Arg::Accumulate(name, _) => (name.to_lowercase(), true),
            Arg::I64(name) | Arg::I32(name) => (name.to_lowercase(), false),
        })
        .collect()
}

/// A launch layer's argument expression reduced to the table's name: the last field of a path,
/// without casts, `&`, `mut`, a reborrow's `*` and the `_v` (view) / `_i` (integer) suffixes.
fn arg_name(expr: &str) -> String {
    let expr = expr
        .trim()
        .trim_start_matches('&')
        .trim_start_matches("mut ")
        .trim_start_matches('*');
    let expr = expr.split(" as ").next().unwrap().trim();
    let last = expr.rsplit('.').next().unwrap();
    let last = last.strip_suffix("_v").unwrap_or(last);
    let last = last.strip_suffix("_i").unwrap_or(last);
    last.to_lowercase()
}

/// CUDA: from each `function(dev, &SPEC, ..)` to the next `.launch(`, the `.arg(..)` calls.
fn cuda_launches(src: &str) -> Vec<Launch> {
    let mut launches = Vec::new();
    for (at, _) in src.match_indices("function(dev, &") {
        let rest = &src[at + "function(dev, &".len()..];
        let spec = rest.split(',').next().unwrap().trim().to_string();
        let body = &rest[..rest.find(".launch(").expect("a launch after function()")];
        let args = body
            .match_indices(".arg(")
            .map(|(i, _)| {
                let inner = &body[i + 5..];
                let expr = &inner[..inner.find(')').unwrap()];
                (arg_name(expr), expr.trim().starts_with("&mut "))
            })
            .collect();
        launches.push((spec, args));
    }
    launches
}

/// HIP: each `let args = [..];` and the spec of the launch that follows it.
fn hip_launches(src: &str) -> Vec<Launch> {
    let mut launches = Vec::new();
    for (at, _) in src.match_indices("let args = [") {
        let rest = &src[at + "let args = [".len()..];
        let list = &rest[..rest.find("];").unwrap()];
        let after = &rest[rest.find("];").unwrap()..];
        let spec_at = after.find("launch(").expect("a launch after args");
        let call = &after[spec_at..];
        let spec = call[call.find('&').unwrap() + 1..]
            .split(',')
            .next()
            .unwrap()
            .trim()
            .to_string();
        let args = list
            .split("),")
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                if let Some(scalar) = item
                    .strip_prefix("KernelArg::I64(")
                    .or_else(|| item.strip_prefix("KernelArg::I32("))
                {
                    (arg_name(scalar.trim_end_matches([')', ','])), false)
                } else if let Some(buf) = item
                    .strip_suffix(".arg_mut(")
                    .or_else(|| item.trim_end_matches([')', ',']).strip_suffix(".arg_mut("))
                {
                    (arg_name(buf), true)
                } else {
                    let buf = item.trim_end_matches([')', ',']);
                    let buf = buf.strip_suffix(".arg(").unwrap_or_else(|| {
                        panic!("unexpected HIP kernel argument {item:?} for {spec}")
                    });
                    (arg_name(buf), false)
                }
            })
            .collect();
        launches.push((spec, args));
    }
    launches
}

#[test]
fn cuda_and_hip_layers_pass_the_table_arguments() {
    let cuda = layer_launches(&CUDA_LAYER, cuda_launches);
    let hip = layer_launches(&HIP_LAYER, hip_launches);
    assert!(!cuda.is_empty() && !hip.is_empty(), "no launches found");
    for (layer, launches) in [("CUDA", &cuda), ("HIP", &hip)] {
        for (spec, args) in launches.iter() {
            assert_eq!(
                args,
                &table_args(&spec_named(spec)),
                "{layer} layer launches {spec} with arguments that differ from the table"
            );
        }
    }
    let mut cuda_specs: Vec<&str> = cuda.iter().map(|(s, _)| s.as_str()).collect();
    let mut hip_specs: Vec<&str> = hip.iter().map(|(s, _)| s.as_str()).collect();
    cuda_specs.sort();
    cuda_specs.dedup();
    hip_specs.sort();
    hip_specs.dedup();
    assert_eq!(
        hip_specs, cuda_specs,
        "HIP and CUDA launch different kernels"
    );
    // Every table entry is launched (none forgotten by both layers).
    assert_eq!(
        cuda_specs.len(),
        KERNELS.len(),
        "table entries nobody launches"
    );
}

#[test]
fn the_argument_parser_sees_a_drift() {
    // The checks above are only as good as the parsing: a swapped or read-only argument must
    // come out different from the table.
    let cuda = "function(dev, &PRE_FWD, t, n)?; b.arg(&h_v).arg(&x_v).arg(&mut u).arg(&tokens_i).arg(&c_i); b.launch(";
    let (_, args) = &cuda_launches(cuda)[0];
    assert_ne!(args, &table_args(&PRE_FWD));
    let hip = "let args = [x.arg(), h.arg(), u.arg(), KernelArg::I64(tokens as i64), KernelArg::I64(c as i64)];\n launch(dev, &PRE_FWD, shape)";
    let (_, args) = &hip_launches(hip)[0];
    assert_ne!(args, &table_args(&PRE_FWD));
    let fixed = hip.replace("u.arg()", "u.arg_mut()");
    assert_eq!(&hip_launches(&fixed)[0].1, &table_args(&PRE_FWD));
}

#[cfg(feature = "hip")]
mod with_hip {
    use super::*;
    use candle_core::DType;
    use mhc_train::gpu::{Module, MAX_STREAMS, MIN_STREAMS};
    use mhc_train::hip::runtime::{code_object, embedded_archs, pack_args, KernelArg};
    use std::collections::HashMap;
    use std::process::Command;

    /// (offset, size, value_kind) of each explicit argument, per kernel name, from the AMD
    /// kernel metadata of a code object.
    fn kernel_args(object: &[u8]) -> HashMap<String, Vec<(usize, usize, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.co");
        std::fs::write(&path, object).unwrap();
        let out = Command::new("llvm-readelf-19")
            .arg("--notes")
            .arg(&path)
            .output()
            .expect("llvm-readelf-19 (scripts/setup-hip.sh installs it)");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut kernels = HashMap::new();
        for kernel in text.split("\n  - .").skip(1) {
            let field = |key: &str, s: &str| -> Option<String> {
                s.lines()
                    .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
            };
            // The kernel's own fields sit 4 spaces in (its arguments' deeper).
            let name = kernel
                .lines()
                .find_map(|l| l.strip_prefix("    .name:").map(|v| v.trim().to_string()))
                .expect("kernel metadata has a .name");
            let mut args = Vec::new();
            // The `.args:` list only: it ends at the kernel's next field (4 spaces in); other
            // list fields (`.language_version:`) share the item indentation.
            let args_text = kernel
                .split_once("\n    .args:")
                .map_or("", |(_, rest)| rest.split("\n    .").next().unwrap());
            for arg in args_text.split("\n      - ").skip(1) {
                let arg = arg.split("\n    .").next().unwrap();
                let kind = field(".value_kind:", arg).unwrap();
                if kind.starts_with("hidden_") {
                    break;
                }
                let num = |key| field(key, arg).unwrap().parse::<usize>().unwrap();
                args.push((num(".offset:"), num(".size:"), kind));
            }
            kernels.insert(name, args);
        }
        kernels
    }

    /// What `pack_args` lays out for a spec: C layout, pointers 8 bytes.
    fn table_layout(spec: &KernelSpec) -> Vec<(usize, usize, String)> {
        let mut offset = 0usize;
        spec.args
            .iter()
            .map(|arg| {
                let (size, kind) = match arg {
                    Arg::In(..) | Arg::Out(..) | Arg::Accumulate(..) => (8, "global_buffer"),
                    Arg::I64(_) => (8, "by_value"),
                    Arg::I32(_) => (4, "by_value"),
                };
                offset = offset.next_multiple_of(size);
                let at = offset;
                offset += size;
                (at, size, kind.to_string())
            })
            .collect()
    }

    fn dtypes(spec: &KernelSpec) -> Vec<DType> {
        if spec.per_dtype {
            vec![DType::F32, DType::BF16]
        } else {
            vec![DType::F32]
        }
    }

    #[test]
    fn embedded_objects_hold_every_table_kernel_with_its_layout() {
        assert_eq!(embedded_archs(), ["gfx942", "gfx90a"]);
        for arch in embedded_archs() {
            let objects: HashMap<Module, _> = Module::ALL
                .iter()
                .map(|m| {
                    let object = code_object(arch, m.stem())
                        .unwrap_or_else(|| panic!("no {}.{arch} object", m.stem()));
                    (*m, kernel_args(object))
                })
                .collect();
            for spec in KERNELS.iter() {
                for dtype in dtypes(spec) {
                    for n in MIN_STREAMS..=MAX_STREAMS {
                        let symbol = spec.symbol(dtype, n).unwrap();
                        let found = objects[&spec.module].get(&symbol).unwrap_or_else(|| {
                            panic!("{symbol} missing from {}.{arch}", spec.module.stem())
                        });
                        assert_eq!(found, &table_layout(spec), "{symbol} ({arch})");
                    }
                }
            }
        }
    }

    #[test]
    fn packer_refuses_arguments_the_table_does_not_list() {
        let ptr = |dtype, writable| KernelArg::Pointer {
            ptr: std::ptr::null_mut(),
            dtype,
            writable,
        };
        let good = [
            ptr(DType::BF16, false),
            ptr(DType::F32, false),
            ptr(DType::BF16, true),
            KernelArg::I64(3),
            KernelArg::I64(5),
        ];
        let packed = pack_args(&PRE_FWD, DType::BF16, &good).unwrap();
        assert_eq!(packed.len(), 40);
        assert_eq!(&packed[24..32], &3i64.to_ne_bytes());
        // u read-only, x of the wrong dtype, a missing argument, an i32 for an i64.
        let mut bad = good;
        bad[2] = ptr(DType::BF16, false);
        assert!(pack_args(&PRE_FWD, DType::BF16, &bad).is_err());
        assert!(pack_args(&PRE_FWD, DType::F32, &good).is_err());
        assert!(pack_args(&PRE_FWD, DType::BF16, &good[..4]).is_err());
        let mut bad = good;
        bad[4] = KernelArg::I32(5);
        assert!(pack_args(&PRE_FWD, DType::BF16, &bad).is_err());
        // i32 after i64s: packed at its own 4-byte alignment.
        let stat = [
            ptr(DType::F32, false),
            ptr(DType::F32, true),
            ptr(DType::F32, true),
            KernelArg::I64(7),
            KernelArg::I32(20),
        ];
        let packed = pack_args(&COEFFS_STATIC, DType::F32, &stat).unwrap();
        assert_eq!(packed.len(), 36);
        assert_eq!(&packed[32..36], &20i32.to_ne_bytes());
    }

    #[test]
    fn no_amd_gpu_is_one_clear_error() {
        match mhc_train::hip::runtime::device_count() {
            Err(err) => {
                let message = format!("{err:#}");
                println!("without an AMD GPU: {message}");
                assert!(message.starts_with("no AMD GPU found"), "{message}");
                for result in [
                    mhc_train::hip::selftest(None).map(|_| String::new()),
                    mhc_train::hip::bench(1),
                ] {
                    let message = format!("{:#}", result.unwrap_err());
                    assert!(message.starts_with("no AMD GPU found"), "{message}");
                }
            }
            // On an AMD machine: the device opens, with 64-lane waves and an embedded arch.
            Ok(_) => {
                let dev = mhc_train::hip::runtime::Device::open(0).unwrap();
                assert_eq!(dev.limits.wave, 64);
                assert!(embedded_archs().contains(&dev.arch.as_str()));
            }
        }
    }
}
