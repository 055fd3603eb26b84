//! The tokenizer of a causal-LM source.

use crate::error::{PeftError, Result};
use crate::io::gguf::GgufMetadata;
use crate::io::source::{self, ModelSource, SourceKind};

/// The tokenizer of a causal-LM source: `tokenizer.json` of a folder or hub snapshot, or the
/// tokenizer rebuilt from a GGUF file's metadata. A source without one is an error naming the
/// file that is missing.
pub fn load_causal_tokenizer(src: &ModelSource) -> Result<tokenizers::Tokenizer> {
    if src.kind == SourceKind::Gguf {
        // Metadata only: the tokenizer does not depend on the architecture being loadable.
        return GgufMetadata::open(&src.config)?.tokenizer();
    }
    let path = match &src.tokenizer {
        Some(p) => p.clone(),
        None => {
            let expected = src.dir.join(source::TOKENIZER_FILE);
            return Err(PeftError::io(
                &expected,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "missing: model `{}` has no {} (a causal-LM task needs its tokenizer)",
                        src.spec,
                        source::TOKENIZER_FILE
                    ),
                ),
            ));
        }
    };
    tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        PeftError::config(
            path.display().to_string(),
            format!("not a valid tokenizer.json: {e}"),
        )
    })
}
