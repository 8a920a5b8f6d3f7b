pub use selective_scan;
