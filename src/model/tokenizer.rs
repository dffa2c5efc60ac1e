//! The model folder's `tokenizer.json`, through the `tokenizers` crate (pure-Rust build).

use std::path::{Path, PathBuf};

use super::ModelError;

/// File name of the Hugging Face tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A Hugging Face tokenizer. Text is encoded without the tokenizer's own special tokens, and `<bos>` is
/// prepended by [`Tokenizer::encode_with_bos`], so the ids do not depend on the post-processor.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`; a clear [`ModelError::NoTokenizer`] when the folder has none.
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.exists() {
            return Err(ModelError::NoTokenizer {
                folder: dir.to_path_buf(),
            });
        }
        Self::from_file(&path)
    }

    /// Loads the folder's tokenizer if it has one.
    pub fn from_folder_if_present(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(TOKENIZER_FILE);
        if path.exists() {
            Self::from_file(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        // A regular file of bounded size only (not a FIFO or a device, which would block or never end).
        let bytes = crate::format::files::read_limited(path, crate::format::files::SIDE_FILE_LIMIT)
            .map_err(|e| ModelError::io(path, e))?;
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("cannot load: {e}"),
            })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error("cannot encode the text", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ids of `text` (special tokens written in it, such as `<start_of_turn>`, become their ids; none
    /// is added) and each token's byte span in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error("cannot encode the text", e))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// `<bos>` followed by the ids of `text`: how Gemma expects any scored or prompted text to start.
    pub fn encode_with_bos(&self, text: &str, bos: u32) -> Result<Vec<u32>, ModelError> {
        let mut ids = vec![bos];
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| self.error("cannot decode token ids", e))
    }

    /// The id of a token such as `<end_of_turn>`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a byte-fallback token (`<0x41>`).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
    }

    /// A decoder that turns ids arriving one by one into text pieces (see [`TextStream`]).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    fn error(&self, what: &str, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            reason: format!("{what}: {e}"),
        }
    }
}

/// Incremental decoding for streaming: each new id yields the text it completes. Text that ends inside a
/// run of byte-fallback tokens is held back until the run ends, or until [`TextStream::finish`]. For
/// decoders that act token by token (Gemma's: "▁" → " ", byte fallback, fuse) the pieces put together
/// equal [`Tokenizer::decode`] of all the ids.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// The text returned so far.
    emitted: String,
}

impl TextStream<'_> {
    /// The new text after `id`, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        // A run of byte-fallback tokens decodes as a whole (to U+FFFD for each byte if the run is not
        // UTF-8), so its text is final only once a token of another kind follows.
        if self.tokenizer.is_byte_token(id) {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.advance(text))
    }

    /// Whatever text is still held back.
    pub fn finish(&mut self) -> Result<String, ModelError> {
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(self.advance(text))
    }

    fn advance(&mut self, text: String) -> String {
        match text.strip_prefix(self.emitted.as_str()) {
            Some(piece) if !piece.is_empty() => {
                let piece = piece.to_string();
                self.emitted = text;
                piece
            }
            // Nothing new, or decoding changed text already shown (it cannot be taken back).
            _ => String::new(),
        }
    }
}
