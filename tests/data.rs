//! Data readers and batching: TSV header detection, integer and string labels, every bad-row
//! error naming file and line, empty data sets, dynamic padding with MiniLM's tokenizer (whose
//! file ships `padding: Fixed(128)`), and causal-LM chunking.
mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_peft::PeftError;
use candle_peft::data::{
    Batch, LabeledText, chunk_ids, encode_batch, label_tensor, load_tokenizer, num_special_tokens,
    pad_batch, pad_id, read_text, read_tsv, read_tsv_with_labels, tokenize_and_chunk,
};
use tokenizers::Tokenizer;

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn labels(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn ex(label: usize, text: &str) -> LabeledText {
    LabeledText {
        label,
        text: text.to_string(),
    }
}

/// The error must be `Data` at `line` and its message must name the file and the line.
fn assert_data_error(err: PeftError, path: &Path, line: usize, needle: &str) {
    let msg = err.to_string();
    match &err {
        PeftError::Data {
            path: p, line: l, ..
        } => {
            assert_eq!(p, path, "{msg}");
            assert_eq!(*l, line, "{msg}");
        }
        other => panic!("expected a Data error, got {other:?}"),
    }
    let location = if line == 0 {
        format!("{}: ", path.display())
    } else {
        format!("{}:{line}: ", path.display())
    };
    assert!(
        msg.starts_with(&location),
        "`{msg}` does not start with `{location}`"
    );
    assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`");
}

#[test]
fn integer_labels_with_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.tsv",
        "label\tsentence\n0\tpiffle .\n1\tstrong finish\n1\ta\tb\n",
    );
    let d = read_tsv(&p).unwrap();
    assert!(d.header);
    assert_eq!(d.labels, labels(&["0", "1"]));
    assert_eq!(
        d.examples,
        vec![ex(0, "piffle ."), ex(1, "strong finish"), ex(1, "a\tb")]
    );
}

#[test]
fn integer_labels_without_header_and_gaps() {
    let dir = tempfile::tempdir().unwrap();
    // Integer labels are ids as they are: 0..=max, even with a gap.
    let p = write(
        dir.path(),
        "a.tsv",
        "2\tthird\r\n0\tfirst\r\n\r\n  \n0\tagain\n",
    );
    let d = read_tsv(&p).unwrap();
    assert!(!d.header);
    assert_eq!(d.labels, labels(&["0", "1", "2"]));
    assert_eq!(d.label_ids(), vec![2, 0, 0]);
    assert_eq!(d.texts(), vec!["third", "first", "again"]);
    assert_eq!(d.num_labels(), 3);
}

#[test]
fn non_integer_header_word_over_integer_labels() {
    let dir = tempfile::tempdir().unwrap();
    // Not a known header word, but not an integer while every other label is.
    let p = write(
        dir.path(),
        "a.tsv",
        "polarity_score\treview text\n1\tok\n0\tno\n",
    );
    let d = read_tsv(&p).unwrap();
    assert!(d.header);
    assert_eq!(d.len(), 2);
}

#[test]
fn string_labels_sorted_unique() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "s.tsv",
        "Label\ttext\npos\tgreat\nneg\tawful\npos\tfine\nneutral\tmeh\n",
    );
    let d = read_tsv(&p).unwrap();
    assert!(d.header);
    assert_eq!(d.labels, labels(&["neg", "neutral", "pos"]));
    assert_eq!(d.label_ids(), vec![2, 0, 2, 1]);

    // Without a header the first line is data.
    let p = write(dir.path(), "s2.tsv", "pos\tgreat\nneg\tawful\n");
    let d = read_tsv(&p).unwrap();
    assert!(!d.header);
    assert_eq!(d.labels, labels(&["neg", "pos"]));
    assert_eq!(d.label_ids(), vec![1, 0]);

    // A label named like a header word that also labels other lines is data.
    let p = write(dir.path(), "s3.tsv", "label\tx\nlabel\ty\nother\tz\n");
    let d = read_tsv(&p).unwrap();
    assert!(!d.header);
    assert_eq!(d.len(), 3);
}

#[test]
fn glue_column_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "glue.tsv",
        "sentence\tlabel\nhide new secretions\t0\ncontains\ttabs ok\t1\n",
    );
    let d = read_tsv(&p).unwrap();
    assert!(d.header);
    assert_eq!(
        d.examples,
        vec![ex(0, "hide new secretions"), ex(1, "contains\ttabs ok")]
    );
}

#[test]
fn given_label_set() {
    let dir = tempfile::tempdir().unwrap();
    let train = labels(&["neg", "pos"]);
    let p = write(
        dir.path(),
        "eval.tsv",
        "label\tsentence\npos\tgood\nneg\tbad\n",
    );
    let d = read_tsv_with_labels(&p, &train).unwrap();
    assert!(d.header);
    assert_eq!(d.labels, train);
    assert_eq!(d.label_ids(), vec![1, 0]);

    // A label not seen in training.
    let p = write(
        dir.path(),
        "eval2.tsv",
        "label\tsentence\npos\tgood\nneutral\tmeh\n",
    );
    let err = read_tsv_with_labels(&p, &train).unwrap_err();
    assert_data_error(err, &p, 3, "unknown label `neutral`");

    // Integer label sets: "3" is out of range for 0..=1, and a non-integer first line is a
    // header.
    let ints = labels(&["0", "1"]);
    let p = write(dir.path(), "eval3.tsv", "y\ttext\n1\ta\n3\tb\n");
    let err = read_tsv_with_labels(&p, &ints).unwrap_err();
    assert_data_error(err, &p, 3, "unknown label `3`");
    let p = write(dir.path(), "eval4.tsv", "sentiment\ttext\n1\ta\n0\tb\n");
    assert_eq!(
        read_tsv_with_labels(&p, &ints).unwrap().label_ids(),
        vec![1, 0]
    );
}

#[test]
fn bad_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "notab.tsv",
            "label\tsentence\n0\tfine\n1 no tab here\n",
            3,
            "no tab",
        ),
        ("nolabel.tsv", "0\tfine\n\tno label\n", 2, "missing label"),
        (
            "notext.tsv",
            "label\tsentence\n0\tfine\n\n1\t   \n",
            4,
            "empty text",
        ),
        ("notext2.tsv", "1\t\n", 1, "empty text"),
    ];
    for (name, content, line, needle) in cases {
        let p = write(dir.path(), name, content);
        let err = read_tsv(&p).unwrap_err();
        assert_data_error(err, &p, line, needle);
    }
    // Invalid UTF-8 on line 2.
    let p = dir.path().join("bytes.tsv");
    std::fs::write(&p, b"0\tok\n1\t\xff\xfe bad\n").unwrap();
    assert_data_error(read_tsv(&p).unwrap_err(), &p, 2, "UTF-8");
}

#[test]
fn empty_data_sets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "empty.tsv", "");
    assert_data_error(read_tsv(&p).unwrap_err(), &p, 0, "no examples");
    let p = write(dir.path(), "blank.tsv", "\n  \n\n");
    assert_data_error(read_tsv(&p).unwrap_err(), &p, 0, "no examples");
    let p = write(dir.path(), "header.tsv", "label\tsentence\n");
    assert_data_error(read_tsv(&p).unwrap_err(), &p, 1, "only a header");
    let missing = dir.path().join("missing.tsv");
    let err = read_tsv(&missing).unwrap_err();
    assert!(
        err.to_string().contains("missing.tsv"),
        "{err} does not name the file"
    );
}

#[test]
fn sst2_sample() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sst2");
    let train = read_tsv(root.join("train.tsv")).unwrap();
    assert!(train.header);
    assert_eq!(train.len(), 4000);
    assert_eq!(train.labels, labels(&["0", "1"]));
    assert_eq!(train.examples[0], ex(0, "piffle ."));
    assert_eq!(train.examples[1], ex(1, "strong finish"));
    let pos = train.label_ids().iter().filter(|l| **l == 1).count();
    println!("sst2 train: {} examples, {pos} positive", train.len());
    assert!(pos > 1000 && pos < 3000);
    let valid = read_tsv_with_labels(root.join("valid.tsv"), &train.labels).unwrap();
    assert_eq!(valid.len(), 1000);
    assert_eq!(valid.examples[0], ex(1, "is among wiseman 's warmest"));
}

fn minilm_tokenizer_path() -> PathBuf {
    common::minilm_dir().join("tokenizer.json")
}

/// `[CLS] … [SEP]` ids of `text` without padding or truncation.
fn plain_ids(text: &str) -> Vec<u32> {
    let mut tok = Tokenizer::from_file(minilm_tokenizer_path()).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    tok.encode(text, true).unwrap().get_ids().to_vec()
}

fn rows(b: &Batch) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    (
        b.input_ids.to_vec2::<u32>().unwrap(),
        b.attention_mask.to_vec2::<u32>().unwrap(),
    )
}

#[test]
fn tokenizer_fixed_padding_is_turned_off() {
    let path = minilm_tokenizer_path();
    // The file pads every sequence to 128.
    let raw = Tokenizer::from_file(&path).unwrap();
    assert!(raw.get_padding().is_some());
    assert_eq!(
        raw.encode("hello world", true).unwrap().get_ids().len(),
        128
    );

    let tok = load_tokenizer(&path, 64).unwrap();
    assert!(tok.get_padding().is_none());
    assert_eq!(tok.get_truncation().unwrap().max_length, 64);
    let ids = tok.encode("hello world", true).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![101, 7592, 2088, 102]);
    assert_eq!(num_special_tokens(&tok), 2);
    assert_eq!(pad_id(&tok), 0);
    // No room for text: an error.
    assert!(load_tokenizer(&path, 2).is_err());
    let err = load_tokenizer(path.with_file_name("nope.json"), 64).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn dynamic_padding() {
    let tok = load_tokenizer(minilm_tokenizer_path(), 128).unwrap();
    let texts = [
        "hello world",
        "a considerably longer sentence, with quite a few more tokens in it",
        "hi",
    ];
    let expected: Vec<Vec<u32>> = texts.iter().map(|t| plain_ids(t)).collect();
    let lens: Vec<usize> = expected.iter().map(Vec::len).collect();
    let longest = *lens.iter().max().unwrap();
    println!("lengths {lens:?}, padded to {longest}");
    assert_eq!(lens[0], 4);
    assert!(longest > 10 && longest < 128);

    let b = encode_batch(&tok, &texts, 128, &Device::Cpu).unwrap();
    assert_eq!(b.input_ids.dims(), &[3, longest]);
    assert_eq!(b.attention_mask.dims(), &[3, longest]);
    assert_eq!(b.input_ids.dtype(), candle_core::DType::U32);
    assert_eq!(b.tokens, lens.iter().sum::<usize>());
    let (ids, mask) = rows(&b);
    for i in 0..3 {
        assert_eq!(&ids[i][..lens[i]], expected[i].as_slice());
        assert!(ids[i][lens[i]..].iter().all(|&t| t == 0), "pad ids");
        assert!(mask[i][..lens[i]].iter().all(|&m| m == 1));
        assert!(mask[i][lens[i]..].iter().all(|&m| m == 0));
    }

    // The raw tokenizer (fixed padding to 128 still on) gives the same batch.
    let raw = Tokenizer::from_file(minilm_tokenizer_path()).unwrap();
    let b2 = encode_batch(&raw, &texts, 128, &Device::Cpu).unwrap();
    assert_eq!(rows(&b2), rows(&b));
    assert_eq!(b2.tokens, b.tokens);

    // A batch of short texts is short.
    let b3 = encode_batch(&tok, &["hi", "hello world"], 128, &Device::Cpu).unwrap();
    assert_eq!(b3.input_ids.dims(), &[2, 4]);
    assert_eq!(b3.tokens, 3 + 4);

    assert!(encode_batch(&tok, &[], 128, &Device::Cpu).is_err());
}

#[test]
fn truncation_keeps_sep() {
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let full = plain_ids(long);
    assert!(full.len() > 10);
    // Truncation by the tokenizer (max_len 8) and by encode_batch (raw tokenizer, max_len 8)
    // agree: 7 tokens of text... [CLS] + 6 words + [SEP].
    let tok = load_tokenizer(minilm_tokenizer_path(), 8).unwrap();
    let raw = Tokenizer::from_file(minilm_tokenizer_path()).unwrap();
    for t in [&tok, &raw] {
        let b = encode_batch(t, &[long, "hi"], 8, &Device::Cpu).unwrap();
        let (ids, mask) = rows(&b);
        assert_eq!(b.input_ids.dims(), &[2, 8]);
        let mut want = full[..7].to_vec();
        want.push(102);
        assert_eq!(ids[0], want);
        assert_eq!(mask[1], vec![1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(b.tokens, 8 + 3);
    }
}

#[test]
fn pad_batch_and_labels() {
    let b = pad_batch(&[vec![5, 6, 7], vec![8]], 9, &Device::Cpu).unwrap();
    let (ids, mask) = rows(&b);
    assert_eq!(ids, vec![vec![5, 6, 7], vec![8, 9, 9]]);
    assert_eq!(mask, vec![vec![1, 1, 1], vec![1, 0, 0]]);
    assert_eq!(b.tokens, 4);
    assert!(pad_batch(&[], 0, &Device::Cpu).is_err());
    assert!(pad_batch(&[vec![]], 0, &Device::Cpu).is_err());
    let l = label_tensor(&[1, 0, 2], &Device::Cpu).unwrap();
    assert_eq!(l.to_vec1::<u32>().unwrap(), vec![1, 0, 2]);
}

#[test]
fn causal_lm_chunking() {
    let ids: Vec<u32> = (1..=10).collect();
    assert_eq!(
        chunk_ids(&ids, 4, false),
        vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]]
    );
    assert_eq!(
        chunk_ids(&ids, 4, true),
        vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]
    );
    assert_eq!(chunk_ids(&ids, 5, false).len(), 2);
    assert!(chunk_ids(&ids, 0, true).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..40)
        .map(|i| format!("line {i} of the corpus goes here.\n"))
        .collect();
    let p = write(dir.path(), "corpus.txt", &text);
    let read = read_text(&p).unwrap();
    assert_eq!(read, text);

    // Truncation to 16 in the tokenizer does not cut the corpus.
    let tok = load_tokenizer(minilm_tokenizer_path(), 16).unwrap();
    let mut plain = Tokenizer::from_file(minilm_tokenizer_path()).unwrap();
    plain.with_padding(None);
    plain.with_truncation(None).unwrap();
    let all = plain
        .encode(text.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(all.len() > 200, "{}", all.len());
    assert!(
        !all.contains(&101) && !all.contains(&102),
        "no special tokens"
    );
    let chunks = tokenize_and_chunk(&tok, &read, 32, false).unwrap();
    println!("{} tokens -> {} chunks of 32", all.len(), chunks.len());
    assert_eq!(chunks.len(), all.len() / 32);
    assert!(chunks.iter().all(|c| c.len() == 32));
    assert_eq!(chunks.concat(), all[..chunks.len() * 32].to_vec());
    let kept = tokenize_and_chunk(&tok, &read, 32, true).unwrap();
    assert_eq!(kept.concat(), all);

    // Too short for one sequence: an error, unless the partial piece is kept.
    assert!(tokenize_and_chunk(&tok, "tiny text", 32, false).is_err());
    assert_eq!(
        tokenize_and_chunk(&tok, "tiny text", 32, true).unwrap(),
        vec![vec![4714, 3793]]
    );

    let empty = write(dir.path(), "empty.txt", " \n\n");
    assert_data_error(read_text(&empty).unwrap_err(), &empty, 0, "no text");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"ok\nstill ok\n\xff\n").unwrap();
    assert_data_error(read_text(&bad).unwrap_err(), &bad, 3, "UTF-8");
}
