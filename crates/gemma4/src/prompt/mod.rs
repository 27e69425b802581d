//! Text into ids: the checkpoint's [`tokenizer`] and [`chat`] template.

pub mod chat;
pub mod tokenizer;
