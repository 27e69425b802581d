//! Images and video: [`image_processor`] (with [`resize`]) and [`video`] turn files into
//! patches; [`tower`] (the vision tower) or [`image_embedder`] (the 12B's) turn patches
//! into soft tokens.

pub mod image_embedder;
pub mod image_processor;
pub mod resize;
pub mod tower;
pub mod video;
