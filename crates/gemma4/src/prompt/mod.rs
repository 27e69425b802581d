//! Text into ids and back: the checkpoint's [`tokenizer`] and [`chat`] template (with
//! [`tool_responses`] for the launch-era templates), and the
//! model's output read into a message ([`output_parser`], with the tool-call arguments'
//! [`object_notation`]).

pub mod chat;
pub mod object_notation;
pub mod output_parser;
pub mod tokenizer;
pub mod tool_responses;
