pub mod memfs;
pub mod stackfs;
