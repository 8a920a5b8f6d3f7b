//! A global allocator that keeps freed large blocks for reuse: [`ReuseLarge`].
//!
//! A CPU model allocates a new tensor for (almost) every op and frees it soon after. Blocks
//! above the C library's `mmap` threshold (glibc: 32 MiB at most, which [`keep_freed_memory`]
//! sets; a training batch of 8 at VMamba's first stage has many tensors above it, and so has
//! the scan bench's C2 shape, `[8, 384, 3136]` in f32) come fresh from the operating system
//! each time and go back to it on free, so every op pays again for the page faults and for the
//! kernel zeroing the pages. On the 2-core development machine that was more than a third of the
//! C2 scan's forward + backward through `Autodiff<NdArray>` (a profile: the kernel's
//! `clear_page` under the scan's first writes). PyTorch's GPU allocators keep freed device
//! memory for the same reason.
//!
//! [`ReuseLarge`] wraps another allocator (the system's by default). Requests of at least
//! `min_bytes` are rounded up to a size class (4 significant bits: less than 1/8 more than asked,
//! in whole 4 KiB pages) and served from a free block of the same class and alignment when it
//! holds one; freed blocks are kept (the most recent reused first) until a cap (by default a
//! quarter of the physical memory) would be exceeded, when the oldest are returned to the inner allocator. Smaller requests go
//! straight to the inner allocator. Contents are never relied on: `alloc_zeroed` zeroes a reused
//! block. Tensors' values do not depend on where they live, so results are unchanged; memory
//! held by the process grows by at most the cap in free blocks.
//!
//! `classify`, `train` and the benches install it; a library user opts in from their binary:
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: vmamba::alloc::ReuseLarge = vmamba::alloc::ReuseLarge::system();
//! ```
//!
//! [`keep_freed_memory`]: crate::runtime::keep_freed_memory

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Requests from this size up are cached by [`ReuseLarge::system`] (1 MiB).
pub const DEFAULT_MIN_BYTES: usize = 1 << 20;

/// Free bytes [`ReuseLarge::system`] keeps at most where the physical memory is unknown
/// (2 GiB); elsewhere a quarter of the physical memory (a training step frees its activations,
/// which the next step allocates again).
pub const DEFAULT_MAX_CACHED_BYTES: usize = 2 << 30;

/// A quarter of the physical memory where the OS tells it, else [`DEFAULT_MAX_CACHED_BYTES`].
fn default_cap() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions and does not allocate.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let (Ok(pages @ 1..), Ok(page @ 1..)) = (usize::try_from(pages), usize::try_from(page)) {
            return pages.saturating_mul(page) / 4;
        }
    }
    DEFAULT_MAX_CACHED_BYTES
}

/// `max_cached_bytes` meaning "[`default_cap`], computed at the first free".
const AUTO_CAP: usize = usize::MAX;

/// Free blocks kept at most (their bookkeeping is a fixed array, so the allocator never
/// allocates for itself).
const SLOTS: usize = 1024;

/// Alignments above this go straight to the inner allocator (a page: no tensor asks for more).
const MAX_ALIGN: usize = 4096;

/// A free block: its address, size class and alignment, and when it was freed.
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    class: usize,
    align: usize,
    stamp: u64,
}

impl Block {
    /// The block at `ptr` of layout `class`, freed at `stamp`.
    fn new(ptr: *mut u8, class: Layout, stamp: u64) -> Self {
        Self {
            addr: ptr as usize,
            class: class.size(),
            align: class.align(),
            stamp,
        }
    }
}

struct Cache {
    slots: [Option<Block>; SLOTS],
    /// Sum of the free blocks' classes.
    bytes: usize,
    /// Free events so far (the blocks' stamps).
    clock: u64,
}

impl Cache {
    /// The free blocks with their slots.
    fn blocks(&self) -> impl Iterator<Item = (usize, Block)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|b| (i, b)))
    }

    /// The block in slot `i` (which holds one), taken out.
    fn remove(&mut self, i: usize) -> Block {
        let block = self.slots[i].take().expect("the slot holds a block");
        self.bytes -= block.class;
        block
    }
}

/// A global allocator over `A` that keeps freed blocks of at least `min_bytes` for reuse (see
/// the [module documentation](self)).
pub struct ReuseLarge<A = System> {
    inner: A,
    min_bytes: usize,
    /// The cap, or [`AUTO_CAP`] until [`ReuseLarge::cap`] first computes it.
    max_cached_bytes: std::sync::atomic::AtomicUsize,
    cache: Mutex<Cache>,
}

impl ReuseLarge<System> {
    /// Over the system allocator, caching blocks from [`DEFAULT_MIN_BYTES`] up, at most a
    /// quarter of the physical memory of them ([`DEFAULT_MAX_CACHED_BYTES`] where the OS does
    /// not say).
    pub const fn system() -> Self {
        Self::new(System, DEFAULT_MIN_BYTES, AUTO_CAP)
    }
}

impl<A> ReuseLarge<A> {
    /// Over `inner`, caching freed blocks of at least `min_bytes` (clamped to one page or more),
    /// at most `max_cached_bytes` of them (`usize::MAX`: a quarter of the physical memory).
    pub const fn new(inner: A, min_bytes: usize, max_cached_bytes: usize) -> Self {
        Self {
            inner,
            min_bytes: if min_bytes < 4096 { 4096 } else { min_bytes },
            max_cached_bytes: std::sync::atomic::AtomicUsize::new(max_cached_bytes),
            cache: Mutex::new(Cache {
                slots: [None; SLOTS],
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// Bytes held in free blocks now.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The most bytes kept in free blocks.
    pub fn cap(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        match self.max_cached_bytes.load(Relaxed) {
            AUTO_CAP => {
                let cap = default_cap();
                self.max_cached_bytes.store(cap, Relaxed);
                cap
            }
            cap => cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Nothing panics while the lock is held; a poisoned lock still holds a consistent cache.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The layout a cached request is allocated with, or `None` for requests passed through.
    fn class_layout(&self, layout: Layout) -> Option<Layout> {
        if layout.size() < self.min_bytes || layout.align() > MAX_ALIGN {
            return None;
        }
        let class = size_class(layout.size())?;
        Layout::from_size_align(class, layout.align()).ok()
    }

    /// A free block of `class` (the most recently freed one), taken out of the cache.
    fn take(&self, class: Layout) -> Option<*mut u8> {
        let mut cache = self.lock();
        let (i, _) = cache
            .blocks()
            .filter(|(_, b)| b.class == class.size() && b.align == class.align())
            .max_by_key(|(_, b)| b.stamp)?;
        Some(cache.remove(i).addr as *mut u8)
    }
}

impl<A: GlobalAlloc> ReuseLarge<A> {
    /// Returns every free block to the inner allocator.
    pub fn release(&self) {
        while let Some(block) = self.evict_oldest() {
            self.free_block(block);
        }
    }

    fn evict_oldest(&self) -> Option<Block> {
        let mut cache = self.lock();
        let (i, _) = cache.blocks().min_by_key(|(_, b)| b.stamp)?;
        Some(cache.remove(i))
    }

    fn free_block(&self, block: Block) {
        // SAFETY: `block` was allocated by `inner` with exactly this layout (a valid one: it was
        // built by `class_layout`) and is owned by the cache, which just gave it up.
        unsafe {
            self.inner.dealloc(
                block.addr as *mut u8,
                Layout::from_size_align_unchecked(block.class, block.align),
            );
        }
    }

    /// Keeps a freed block of layout `class`, evicting the oldest ones to make room; frees it
    /// at once if it alone exceeds the cap.
    fn keep(&self, ptr: *mut u8, class: Layout) {
        let cap = self.cap();
        while class.size() <= cap {
            {
                let mut cache = self.lock();
                let free_slot = cache.slots.iter().position(Option::is_none);
                if let Some(i) = free_slot.filter(|_| cache.bytes + class.size() <= cap) {
                    cache.clock += 1;
                    cache.slots[i] = Some(Block::new(ptr, class, cache.clock));
                    cache.bytes += class.size();
                    return;
                }
            }
            // Freed outside the lock (returning memory to the OS can take a while). With
            // nothing left to evict the block would fit, so this cannot end the loop; but never
            // loop forever in an allocator.
            match self.evict_oldest() {
                Some(block) => self.free_block(block),
                None => break,
            }
        }
        self.free_block(Block::new(ptr, class, 0));
    }
}

/// `size` rounded up to whole 4 KiB pages and to 4 significant bits (less than 1/8 more);
/// `None` on overflow.
fn size_class(size: usize) -> Option<usize> {
    let bits = usize::BITS - size.leading_zeros();
    let step = 1usize << bits.saturating_sub(4).max(12);
    size.checked_next_multiple_of(step)
}

// SAFETY: every block handed out is either the inner allocator's answer to a valid layout
// (`class_layout`'s, at least as large and as aligned as the request), or a block of exactly
// that class and alignment that was freed to the cache and is handed out once (taken out of its
// slot under the lock). Deallocation recomputes the same class from the caller's layout, which
// the `GlobalAlloc` contract makes the allocation's.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ReuseLarge<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.class_layout(layout) {
            // SAFETY: the caller's contract (a non-zero-size layout).
            None => unsafe { self.inner.alloc(layout) },
            Some(class) => match self.take(class) {
                Some(ptr) => ptr,
                // SAFETY: `class` is a valid layout of non-zero size.
                None => unsafe { self.inner.alloc(class) },
            },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.class_layout(layout) {
            // SAFETY: the caller's contract.
            None => unsafe { self.inner.alloc_zeroed(layout) },
            Some(class) => match self.take(class) {
                Some(ptr) => {
                    // SAFETY: the block holds `class.size() ≥ layout.size()` bytes.
                    unsafe { ptr.write_bytes(0, layout.size()) };
                    ptr
                }
                // Fresh memory: the inner allocator zeroes it (for free where the OS does).
                // SAFETY: `class` is a valid layout of non-zero size.
                None => unsafe { self.inner.alloc_zeroed(class) },
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match self.class_layout(layout) {
            // SAFETY: the caller's contract: `ptr` came from `alloc` with `layout`, which
            // passed it through.
            None => unsafe { self.inner.dealloc(ptr, layout) },
            Some(class) => self.keep(ptr, class),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract makes `new_size` with `layout.align()` a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (self.class_layout(layout), self.class_layout(new_layout)) {
            // SAFETY: the caller's contract; the block is the inner allocator's own.
            (None, None) => unsafe { self.inner.realloc(ptr, layout, new_size) },
            // Same class: the block already holds `new_size` bytes.
            (Some(old), Some(new)) if old == new => ptr,
            _ => {
                // SAFETY: `new_layout` is valid and of non-zero size (the caller's contract).
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks hold at least the copied bytes and do not overlap
                    // (`new` is a live block distinct from the caller's); `ptr` came from
                    // `alloc` with `layout`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 4).unwrap()
    }

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        for size in [4096, 4097, 1 << 20, (1 << 20) + 1, 38_535_168, 3 << 30] {
            let class = size_class(size).unwrap();
            assert!(
                class >= size && class.is_multiple_of(4096),
                "{size} → {class}"
            );
            assert!(
                (class - size) as f64 <= size as f64 / 8.0 + 4096.0,
                "{size} → {class}"
            );
        }
        assert_eq!(size_class(1 << 20), Some(1 << 20));
        // Sizes within one class share it; the next class starts above it.
        let class = size_class(38_535_168).unwrap();
        assert_eq!(size_class(class), Some(class));
        assert_eq!(size_class(class - 4096 * 100), Some(class));
        assert!(size_class(class + 1).unwrap() > class);
        assert_eq!(size_class(usize::MAX - 5), None);
    }

    #[test]
    fn a_freed_large_block_is_reused_and_zeroed_on_request() {
        let a = ReuseLarge::new(System, 1 << 16, 1 << 24);
        unsafe {
            let p = a.alloc(layout(100_000));
            assert!(!p.is_null());
            p.write_bytes(7, 100_000);
            a.dealloc(p, layout(100_000));
            assert_eq!(a.cached_bytes(), size_class(100_000).unwrap());
            // Another size of the same class gets the same block, zeroed when asked.
            let q = a.alloc_zeroed(layout(99_000));
            assert_eq!(q, p);
            assert_eq!(a.cached_bytes(), 0);
            assert!(
                std::slice::from_raw_parts(q, 99_000)
                    .iter()
                    .all(|&b| b == 0)
            );
            a.dealloc(q, layout(99_000));
            // A larger class does not take it.
            let r = a.alloc(layout(300_000));
            assert_ne!(r, p);
            a.dealloc(r, layout(300_000));
            a.release();
            assert_eq!(a.cached_bytes(), 0);
        }
    }

    #[test]
    fn small_requests_and_large_alignments_pass_through() {
        let a = ReuseLarge::new(System, 1 << 16, 1 << 24);
        unsafe {
            let p = a.alloc(layout(1000));
            a.dealloc(p, layout(1000));
            let big_align = Layout::from_size_align(1 << 17, 1 << 13).unwrap();
            let q = a.alloc(big_align);
            assert_eq!(q as usize % (1 << 13), 0);
            a.dealloc(q, big_align);
        }
        assert_eq!(a.cached_bytes(), 0);
    }

    #[test]
    fn the_cap_evicts_the_oldest_blocks() {
        let class = size_class(1 << 20).unwrap();
        let a = ReuseLarge::new(System, 1 << 16, 2 * class);
        unsafe {
            let blocks: Vec<*mut u8> = (0..3).map(|_| a.alloc(layout(1 << 20))).collect();
            for &p in &blocks {
                a.dealloc(p, layout(1 << 20));
            }
            assert_eq!(a.cached_bytes(), 2 * class);
            // The first freed went back to the system; the newest is reused first.
            assert_eq!(a.alloc(layout(1 << 20)), blocks[2]);
            assert_eq!(a.alloc(layout(1 << 20)), blocks[1]);
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(blocks[1], layout(1 << 20));
            a.dealloc(blocks[2], layout(1 << 20));
            // A block larger than the cap is never kept.
            let huge = a.alloc(layout(3 << 20));
            a.dealloc(huge, layout(3 << 20));
            assert_eq!(a.cached_bytes(), 2 * class);
            a.release();
        }
    }

    #[test]
    fn the_default_cap_is_a_quarter_of_the_memory_or_2_gib() {
        let a = ReuseLarge::system();
        let cap = a.cap();
        assert!(cap >= 1 << 20, "cap {cap}");
        #[cfg(not(unix))]
        assert_eq!(cap, DEFAULT_MAX_CACHED_BYTES);
        assert_eq!(ReuseLarge::new(System, 1 << 16, 12345).cap(), 12345);
    }

    #[test]
    fn realloc_keeps_contents_across_classes() {
        let a = ReuseLarge::new(System, 1 << 16, 1 << 24);
        unsafe {
            // Small to large, large within its class, large to small.
            let p = a.alloc(layout(1000));
            p.write_bytes(3, 1000);
            let q = a.realloc(p, layout(1000), 200_000);
            assert!(std::slice::from_raw_parts(q, 1000).iter().all(|&b| b == 3));
            q.add(1000).write_bytes(5, 199_000);
            let class = size_class(200_000).unwrap();
            let r = a.realloc(q, layout(200_000), class);
            assert_eq!(r, q);
            let s = a.realloc(r, layout(class), 2000);
            let s_bytes = std::slice::from_raw_parts(s, 2000);
            assert!(s_bytes[..1000].iter().all(|&b| b == 3));
            assert!(s_bytes[1000..].iter().all(|&b| b == 5));
            a.dealloc(s, layout(2000));
            // The large block went to the cache when the data moved out of it.
            assert_eq!(a.cached_bytes(), class);
            a.release();
        }
    }
}
