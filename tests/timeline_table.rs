//! scripts/timeline-table.py (the timeline and variants stages of scripts/device-check.sh) on a
//! hand-made profile: two variants, two repetitions, ncu's raw CSV with its units row, one
//! kernel launched twice in a step. The expected cells are worked out by hand below.

use std::process::Command;

const PROFILES: &str = r#"-- base T=1024 C=1280 rep=1
==PROF== Connected to process 1
"ID","Kernel Name","Grid Size","Block Size","gpu__time_duration.sum"
"","","","","nsecond"
"0","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","13,200"
"1","rms_norm_bwd_bf16","(512, 1, 1)","(256, 1, 1)","8,800"
"2","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","1,000"
-- try T=1024 C=1280 rep=1
"ID","Kernel Name","Grid Size","Block Size","gpu__time_duration.sum"
"","","","","nsecond"
"0","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","12,000"
"1","rms_norm_bwd_bf16","(512, 1, 1)","(256, 1, 1)","9,000"
-- base T=1024 C=1280 rep=2
"ID","Kernel Name","Grid Size","Block Size","gpu__time_duration.sum"
"","","","","nsecond"
"0","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","13,000"
"1","rms_norm_bwd_bf16","(512, 1, 1)","(256, 1, 1)","9,400"
"2","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","1,100"
-- try T=1024 C=1280 rep=2
"ID","Kernel Name","Grid Size","Block Size","gpu__time_duration.sum"
"","","","","nsecond"
"0","mhc_coeffs_project_bf16_n4","(16, 40, 1)","(128, 1, 1)","12,400"
"1","rms_norm_bwd_bf16","(512, 1, 1)","(256, 1, 1)","8,600"
"#;

fn table(mode: &[&str], input: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("variants-raw.txt");
    std::fs::write(&path, input).unwrap();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/timeline-table.py"
        ))
        .args(mode)
        .arg(&path)
        .output()
        .expect("python3");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn variants_side_by_side_fastest_and_slowest_repetition() {
    let (ok, text, err) = table(&[], PROFILES);
    assert!(ok, "{err}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(
        rows,
        [
            "| kernel | base | try |",
            "|---|---|---|",
            // base: 13.2 + 1.0 = 14.2 and 13.0 + 1.1 = 14.1 (both launches of a step added);
            // try: 12.0 and 12.4.
            "| coeffs_project | 14.1/14.2 | 12.0/12.4 |",
            "| rms_norm_bwd | 8.8/9.4 | 8.6/9.0 |",
            // Steps: base 23.0 and 23.5, try 21.0 and 21.0.
            "| total | 23.0/23.5 | 21.0/21.0 |",
        ]
    );
    assert!(text.contains("T=1024 C=1280"), "{text}");
}

#[test]
fn no_profiled_step_is_an_error() {
    let (ok, text, err) = table(&[], "-- base T=1024 C=1280 rep=1\nncu: error\n");
    assert!(!ok, "{text}");
    assert!(err.contains("no profiled steps"), "{err}");
}

#[test]
fn launches_in_order_with_their_total() {
    // The first section alone, as the timeline stage's file holds one build.
    let first = PROFILES.split("-- try").next().unwrap();
    let (ok, text, err) = table(&["--launches"], first);
    assert!(ok, "{err}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "| base T=1024 C=1280 rep=1 | grid | block | us |",
            "|---|---|---|---|",
            "| mhc_coeffs_project_bf16_n4 | (16, 40, 1) | (128, 1, 1) | 13.2 |",
            "| rms_norm_bwd_bf16 | (512, 1, 1) | (256, 1, 1) | 8.8 |",
            "| mhc_coeffs_project_bf16_n4 | (16, 40, 1) | (128, 1, 1) | 1.0 |",
            // 13.2 + 8.8 + 1.0
            "| total (3 kernels) | | | 23.0 |",
        ]
    );
}
