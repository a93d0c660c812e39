//! The data pipeline end to end on small corpora in temp folders: tokenizer round trip, token cache,
//! split, windows, resumable and sharded sampling, llm.c shards, and the errors users will hit.

use mhc_train::config::DataConfig;
use mhc_train::data::{
    load_dataset, load_tokenizer, train_byte_level_bpe, val_batch, Dataset, Sampler, SamplerState,
    TokenStream, BIN_MAGIC, BIN_VERSION, END_OF_TEXT,
};
use std::fs;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

const VOCAB: usize = 300;

/// A few paragraphs of varied English, repeated with numbered variations so BPE has merges to learn.
fn corpus_text(paragraphs: usize) -> String {
    let base = [
        "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
        "In the beginning was the word; the word was with the people who spoke it.",
        "She sells sea shells by the sea shore, where the waves break upon the sand.",
        "A journey of a thousand miles begins with a single step forward.",
    ];
    (0..paragraphs)
        .map(|i| {
            format!(
                "{} ({i})\n{}\n\n",
                base[i % base.len()],
                base[(i * 3 + 1) % base.len()]
            )
        })
        .collect()
}

fn config(dir: &Path, train: Vec<PathBuf>) -> DataConfig {
    DataConfig {
        train,
        val: vec![],
        val_fraction: 0.1,
        tokenizer: dir.join("tok/tokenizer.json"),
        cache_dir: dir.join("cache"),
    }
}

fn write(path: &Path, text: &str) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn all_tokens(stream: &TokenStream) -> Vec<u32> {
    stream.to_vec(0..stream.len())
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn error_of(result: anyhow::Result<Dataset>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Writes an llm.c token shard: 256 int32 header (magic, version, count), then uint16 tokens.
fn write_bin(path: &Path, magic: i32, tokens: &[u16]) {
    let mut header = [0i32; 256];
    header[0] = magic;
    header[1] = BIN_VERSION;
    header[2] = tokens.len() as i32;
    let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    fs::write(path, bytes).unwrap();
}

#[test]
fn tokenizer_round_trips_text_it_was_not_trained_on() {
    let dir = TempDir::new().unwrap();
    let train = write(&dir.path().join("a.txt"), &corpus_text(40));
    let tokenizer = train_byte_level_bpe(&[train], VOCAB).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), VOCAB);
    assert!(tokenizer.token_to_id(END_OF_TEXT).is_some());
    let unseen = "Zebras queue at 10:45 for café crème, naïve  tabs\tand 日本語 emoji 🎉\r\nend ";
    let ids = tokenizer.encode(unseen, false).unwrap().get_ids().to_vec();
    assert!(ids.iter().all(|&id| (id as usize) < VOCAB));
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), unseen);
    // The merges learned something: common training words take fewer tokens than bytes.
    let common = "the sea shore and the word";
    let common_ids = tokenizer.encode(common, false).unwrap().get_ids().len();
    assert!(
        common_ids < common.len() / 2,
        "{common_ids} tokens for {} bytes",
        common.len()
    );
}

#[test]
fn tokenizer_is_trained_once_saved_and_reused() {
    let dir = TempDir::new().unwrap();
    let cfg = config(
        dir.path(),
        vec![write(&dir.path().join("a.txt"), &corpus_text(40))],
    );
    let first = load_dataset(&cfg, VOCAB, 8).unwrap();
    let saved = fs::read(&cfg.tokenizer).unwrap();
    // Training is deterministic: a second tokenizer trained on the same text is byte-identical.
    let retrained = train_byte_level_bpe(&cfg.train, VOCAB)
        .unwrap()
        .to_string(false)
        .unwrap();
    assert_eq!(retrained.as_bytes(), saved.as_slice());
    let second = load_dataset(&cfg, VOCAB, 8).unwrap();
    assert_eq!(fs::read(&cfg.tokenizer).unwrap(), saved);
    assert_eq!(all_tokens(&first.train), all_tokens(&second.train));
    // The streams decode back to the input text followed by the document separator.
    let tokenizer = load_tokenizer(&cfg.tokenizer).unwrap();
    let mut ids = all_tokens(&first.train);
    ids.extend(all_tokens(&first.val));
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        format!("{}{END_OF_TEXT}", corpus_text(40))
    );
}

#[test]
fn token_cache_is_reused_and_invalidated_when_the_input_changes() {
    let dir = TempDir::new().unwrap();
    let input = write(&dir.path().join("a.txt"), &corpus_text(40));
    let cfg = config(dir.path(), vec![input.clone()]);
    let first = load_dataset(&cfg, VOCAB, 8).unwrap();
    let caches = cache_files(dir.path());
    assert_eq!(caches.len(), 1);
    let encoded: Vec<u32> = all_tokens(&first.train)
        .into_iter()
        .chain(all_tokens(&first.val))
        .collect();

    // Replace the cached ids by other valid ids: a load that reads the cache returns those, one that
    // re-encodes would return the original ids.
    let bytes = fs::read(&caches[0]).unwrap();
    let header = 20;
    assert_eq!(
        bytes.len(),
        header + 2 * encoded.len(),
        "u16 cache for a small vocab"
    );
    let mut tampered = bytes[..header].to_vec();
    let fake: Vec<u32> = (0..encoded.len() as u32)
        .map(|i| i % VOCAB as u32)
        .collect();
    tampered.extend(fake.iter().flat_map(|&id| (id as u16).to_le_bytes()));
    fs::write(&caches[0], tampered).unwrap();
    let second = load_dataset(&cfg, VOCAB, 8).unwrap();
    let reread: Vec<u32> = all_tokens(&second.train)
        .into_iter()
        .chain(all_tokens(&second.val))
        .collect();
    assert_eq!(reread, fake);

    // Changing the input gives a new cache file and the new text's ids.
    let new_text = format!("{}One more line.\n", corpus_text(40));
    fs::write(&input, &new_text).unwrap();
    let third = load_dataset(&cfg, VOCAB, 8).unwrap();
    assert_eq!(cache_files(dir.path()).len(), 2);
    let tokenizer = third.tokenizer.as_ref().unwrap();
    let ids: Vec<u32> = all_tokens(&third.train)
        .into_iter()
        .chain(all_tokens(&third.val))
        .collect();
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        format!("{new_text}{END_OF_TEXT}")
    );
}

#[test]
fn split_is_deterministic_and_sized_by_val_fraction() {
    let dir = TempDir::new().unwrap();
    // A folder: files found recursively, in sorted order, each followed by <|endoftext|>.
    write(&dir.path().join("corpus/b.txt"), "Second file.\n");
    write(&dir.path().join("corpus/a/nested.txt"), &corpus_text(30));
    write(&dir.path().join("corpus/skipped.md"), "not a .txt file");
    let mut cfg = config(dir.path(), vec![dir.path().join("corpus")]);
    cfg.val_fraction = 0.25;
    let first = load_dataset(&cfg, VOCAB, 4).unwrap();
    let total = first.train.len() + first.val.len();
    assert_eq!(first.val.len(), (total as f64 * 0.25).round() as usize);
    let tokenizer = first.tokenizer.as_ref().unwrap();
    let mut ids = all_tokens(&first.train);
    ids.extend(all_tokens(&first.val));
    let text = tokenizer.decode(&ids, false).unwrap();
    assert_eq!(
        text,
        format!(
            "{}{END_OF_TEXT}Second file.\n{END_OF_TEXT}",
            corpus_text(30)
        )
    );
    let second = load_dataset(&cfg, VOCAB, 4).unwrap();
    assert_eq!(all_tokens(&first.train), all_tokens(&second.train));
    assert_eq!(all_tokens(&first.val), all_tokens(&second.val));

    // Separate validation files replace the split.
    cfg.val = vec![write(
        &dir.path().join("val.txt"),
        "Held out text for validation only.\n",
    )];
    let separate = load_dataset(&cfg, VOCAB, 4).unwrap();
    assert_eq!(separate.train.len(), total);
    let val_text = tokenizer.decode(&all_tokens(&separate.val), false).unwrap();
    assert_eq!(
        val_text,
        format!("Held out text for validation only.\n{END_OF_TEXT}")
    );
}

fn bin_dataset(tokens: &[u16]) -> (TempDir, Dataset) {
    let dir = TempDir::new().unwrap();
    let shard = dir.path().join("shard_000.bin");
    write_bin(&shard, BIN_MAGIC, tokens);
    let mut cfg = config(dir.path(), vec![shard]);
    cfg.val_fraction = 0.2;
    let dataset = load_dataset(&cfg, 1000, 8).unwrap();
    (dir, dataset)
}

#[test]
fn bin_shards_are_read_back_exactly_without_a_tokenizer() {
    let tokens: Vec<u16> = (0..500u16).map(|i| (i * 7 + 3) % 1000).collect();
    let (_dir, dataset) = bin_dataset(&tokens);
    assert!(dataset.tokenizer.is_none());
    assert_eq!(dataset.train.len(), 400);
    let mut read: Vec<u32> = all_tokens(&dataset.train);
    read.extend(all_tokens(&dataset.val));
    assert_eq!(
        read,
        tokens.iter().map(|&t| u32::from(t)).collect::<Vec<_>>()
    );
}

#[test]
fn windows_are_stream_slices_and_targets_are_inputs_shifted_by_one() {
    let tokens: Vec<u16> = (0..1000u16).collect();
    let (_dir, dataset) = bin_dataset(&tokens);
    let stream = &dataset.train;
    let (seq_len, batch) = (16, 6);
    let (inputs, targets) = Sampler::new(7)
        .next_batch(stream, batch, seq_len, 0, 1)
        .unwrap();
    assert_eq!(inputs.len(), batch * seq_len);
    assert_eq!(targets.len(), batch * seq_len);
    for row in 0..batch {
        let x = &inputs[row * seq_len..(row + 1) * seq_len];
        let y = &targets[row * seq_len..(row + 1) * seq_len];
        // Token i of the stream is i, so the window start is the first input.
        let s = x[0] as usize;
        assert!(s + seq_len < stream.len());
        assert_eq!(x, stream.to_vec(s..s + seq_len).as_slice());
        assert_eq!(y, stream.to_vec(s + 1..s + seq_len + 1).as_slice());
    }
    // Different seeds draw different windows.
    let (other, _) = Sampler::new(8)
        .next_batch(stream, batch, seq_len, 0, 1)
        .unwrap();
    assert_ne!(inputs, other);
}

#[test]
fn sampler_state_restores_the_exact_next_batches() {
    let tokens: Vec<u16> = (0..1000u16).collect();
    let (_dir, dataset) = bin_dataset(&tokens);
    let mut sampler = Sampler::new(42);
    for _ in 0..3 {
        sampler.next_batch(&dataset.train, 4, 8, 0, 1).unwrap();
    }
    let state = sampler.state();
    // The state survives JSON and TOML (a u128 as a string).
    let json: SamplerState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let toml_state: SamplerState = toml::from_str(&toml::to_string(&state).unwrap()).unwrap();
    assert_eq!(json, state);
    assert_eq!(toml_state, state);
    let expected: Vec<_> = (0..3)
        .map(|_| sampler.next_batch(&dataset.train, 4, 8, 0, 1).unwrap())
        .collect();
    let mut resumed = Sampler::from_state(&json);
    let got: Vec<_> = (0..3)
        .map(|_| resumed.next_batch(&dataset.train, 4, 8, 0, 1).unwrap())
        .collect();
    assert_eq!(got, expected);
    // A fresh sampler with the same seed replays from the start, so it differs from the resumed one.
    let (fresh, _) = Sampler::new(42)
        .next_batch(&dataset.train, 4, 8, 0, 1)
        .unwrap();
    assert_ne!(fresh, expected[0].0);
}

#[test]
fn ranks_take_disjoint_slices_whose_union_is_the_global_batch() {
    let tokens: Vec<u16> = (0..1000u16).collect();
    let (_dir, dataset) = bin_dataset(&tokens);
    let (global, seq_len) = (12, 8);
    let mut single = Sampler::new(3);
    let whole: Vec<_> = (0..2)
        .map(|_| {
            single
                .next_batch(&dataset.train, global, seq_len, 0, 1)
                .unwrap()
        })
        .collect();
    for world in [2, 3, 4, 6, 12] {
        let mut samplers: Vec<Sampler> = (0..world).map(|_| Sampler::new(3)).collect();
        for expected in &whole {
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for (rank, sampler) in samplers.iter_mut().enumerate() {
                let (x, y) = sampler
                    .next_batch(&dataset.train, global, seq_len, rank, world)
                    .unwrap();
                assert_eq!(x.len(), global / world * seq_len);
                inputs.extend(x);
                targets.extend(y);
            }
            // Concatenated in rank order, the slices are exactly the world = 1 batch, row for row.
            assert_eq!(&(inputs, targets), expected, "world = {world}");
        }
    }
    let err = Sampler::new(3)
        .next_batch(&dataset.train, 10, seq_len, 0, 4)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not divide evenly over 4 workers"),
        "{err}"
    );
    let err = Sampler::new(3)
        .next_batch(&dataset.train, 8, seq_len, 4, 4)
        .unwrap_err();
    assert!(err.to_string().contains("rank 4"), "{err}");
}

#[test]
fn validation_batches_are_deterministic_disjoint_windows_covering_the_split() {
    let tokens: Vec<u16> = (0..1000u16).collect();
    let (_dir, dataset) = bin_dataset(&tokens);
    let (val, seq_len, rows) = (&dataset.val, 8, 4);
    assert_eq!(val.len(), 200);
    let windows_in_split = (val.len() - 1) / seq_len; // 24 windows, 6 batches of 4
    let mut starts = Vec::new();
    for index in 0..windows_in_split / rows {
        let (x, y) = val_batch(val, index, rows, seq_len);
        assert_eq!((x.clone(), y.clone()), val_batch(val, index, rows, seq_len));
        for row in 0..rows {
            let s = x[row * seq_len] as usize - 800; // val holds tokens 800..1000
            assert_eq!(s % seq_len, 0);
            assert_eq!(
                &x[row * seq_len..(row + 1) * seq_len],
                val.to_vec(s..s + seq_len).as_slice()
            );
            assert_eq!(
                &y[row * seq_len..(row + 1) * seq_len],
                val.to_vec(s + 1..s + seq_len + 1).as_slice()
            );
            starts.push(s);
        }
    }
    // The first batches already reach the end of the split, and all of them tile it exactly once.
    assert!(
        starts[..rows].iter().any(|&s| s >= val.len() / 2),
        "{starts:?}"
    );
    starts.sort();
    assert_eq!(
        starts,
        (0..windows_in_split)
            .map(|k| k * seq_len)
            .collect::<Vec<_>>()
    );
    // The training sampler's draws do not move validation windows.
    let before = val_batch(val, 1, rows, seq_len);
    Sampler::new(1)
        .next_batch(&dataset.train, 4, seq_len, 0, 1)
        .unwrap();
    assert_eq!(val_batch(val, 1, rows, seq_len), before);
}

#[test]
fn errors_name_the_problem() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();

    let missing = d.join("nope.txt");
    let msg = error_of(load_dataset(&config(d, vec![missing]), VOCAB, 8));
    assert!(
        msg.contains("nope.txt") && msg.contains("does not exist"),
        "{msg}"
    );

    let empty = write(&d.join("empty.txt"), "");
    let msg = error_of(load_dataset(&config(d, vec![empty]), VOCAB, 8));
    assert!(
        msg.contains("empty.txt") && msg.contains("is empty"),
        "{msg}"
    );

    fs::create_dir_all(d.join("no_text")).unwrap();
    let msg = error_of(load_dataset(&config(d, vec![d.join("no_text")]), VOCAB, 8));
    assert!(msg.contains("no .txt files"), "{msg}");

    let short = write(&d.join("short.txt"), &corpus_text(4));
    let msg = error_of(load_dataset(&config(d, vec![short.clone()]), VOCAB, 4096));
    assert!(
        msg.contains("seq_len = 4096") && msg.contains("split has"),
        "{msg}"
    );

    let bad_magic = d.join("bad.bin");
    write_bin(&bad_magic, 1234, &[1, 2, 3]);
    let msg = error_of(load_dataset(&config(d, vec![bad_magic]), VOCAB, 1));
    assert!(
        msg.contains("bad.bin") && msg.contains("magic") && msg.contains("1234"),
        "{msg}"
    );

    let truncated = d.join("truncated.bin");
    write_bin(&truncated, BIN_MAGIC, &[1, 2, 3]);
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() - 2]).unwrap();
    let msg = error_of(load_dataset(&config(d, vec![truncated]), VOCAB, 1));
    assert!(
        msg.contains("truncated.bin") && msg.contains("says 3 tokens"),
        "{msg}"
    );

    let big_id = d.join("big_id.bin");
    write_bin(&big_id, BIN_MAGIC, &[1, 2, 300, 4]);
    let msg = error_of(load_dataset(&config(d, vec![big_id.clone()]), VOCAB, 1));
    assert!(
        msg.contains("big_id.bin") && msg.contains("token id 300 at position 2"),
        "{msg}"
    );

    let msg = error_of(load_dataset(
        &config(d, vec![big_id, short.clone()]),
        VOCAB,
        1,
    ));
    assert!(
        msg.contains("mix .bin token shards and text files"),
        "{msg}"
    );

    // A tokenizer trained for 400 tokens does not fit a 300-token model.
    let mut big_vocab = config(d, vec![write(&d.join("big/a.txt"), &corpus_text(80))]);
    big_vocab.tokenizer = d.join("big/tokenizer.json");
    load_dataset(&big_vocab, 400, 8).unwrap();
    let msg = error_of(load_dataset(&big_vocab, VOCAB, 8));
    assert!(
        msg.contains("vocabulary of 400 tokens") && msg.contains("model.vocab_size = 300"),
        "{msg}"
    );

    let not_utf8 = d.join("latin1.txt");
    fs::write(&not_utf8, b"caf\xe9\n").unwrap();
    let msg = error_of(load_dataset(&config(d, vec![not_utf8]), VOCAB, 1));
    assert!(
        msg.contains("latin1.txt") && msg.contains("not UTF-8"),
        "{msg}"
    );
}

/// The shipped corpus at the default vocabulary: trains, round-trips, and compresses.
#[test]
fn shipped_kjv_corpus_loads() {
    let dir = TempDir::new().unwrap();
    let kjv = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt");
    let mut cfg = config(dir.path(), vec![kjv.clone()]);
    cfg.val_fraction = 0.05;
    let start = std::time::Instant::now();
    let dataset = load_dataset(&cfg, 2048, 256).unwrap();
    let first_load = start.elapsed();
    let start = std::time::Instant::now();
    let cached = load_dataset(&cfg, 2048, 256).unwrap();
    let cached_load = start.elapsed();
    let total = dataset.train.len() + dataset.val.len();
    let bytes = fs::metadata(&kjv).unwrap().len() as usize;
    eprintln!(
        "kjv.txt: {bytes} bytes -> {total} tokens ({:.2} bytes/token); train {} val {}; \
         first load (train tokenizer + encode) {first_load:.2?}, cached load {cached_load:.2?}",
        bytes as f64 / total as f64,
        dataset.train.len(),
        dataset.val.len()
    );
    assert_eq!(all_tokens(&cached.train), all_tokens(&dataset.train));
    let tokenizer = dataset.tokenizer.as_ref().unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 2048);
    // A byte-level BPE with 2048 tokens packs English into well over 3 bytes a token.
    assert!(bytes as f64 / total as f64 > 3.0);
    let mut ids = all_tokens(&dataset.train);
    ids.extend(all_tokens(&dataset.val));
    let text = fs::read_to_string(&kjv).unwrap();
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        format!("{text}{END_OF_TEXT}")
    );
}
