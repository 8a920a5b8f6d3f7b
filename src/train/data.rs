//! Data for `train`: the synthetic long-range task, ImageFolder trees, the transforms and the
//! batcher, all on Burn's dataset crate (`Dataset`, `InMemDataset`, `MapperDataset`) and its
//! data loader.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::transform::{Mapper, MapperDataset};
use burn::data::dataset::{Dataset, InMemDataset};
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use image::RgbImage;
use image::imageops::{self, FilterType};
use selective_scan::SplitMix64;

/// One labelled image, 8-bit RGB, before any transform.
#[derive(Debug, Clone)]
pub struct LabeledImage {
    /// The image.
    pub image: RgbImage,
    /// Class index.
    pub label: usize,
}

/// The default task: does the mark in the top-right corner have the colour of the mark in the
/// bottom-left corner?
///
/// Each `size × size` image is noise around mid-grey with two square marks of side
/// `size / 4`, one near the top-right and one near the bottom-left corner (inside a 1-pixel
/// border, each pushed inwards by up to `size / 16` pixels in x and y), each one of
/// [`Self::COLOURS`] colours. Label 1 ("match") when both marks
/// have the same colour, 0 ("differ") otherwise; even indices are "differ", odd indices
/// "match", so every split is balanced. Each corner alone says nothing about the label: a model
/// must carry one mark's colour across the whole image to the other. A 3×3 conv or a small
/// stack of them cannot, the selective scan along rows and columns can. The two corners are
/// the ones that are never the last position of a scan direction (rows, columns and their
/// reverses end top-left or bottom-right), so the wrong "last-position C" shortcut gets no
/// view of them either.
///
/// Deterministic: item `i` of a dataset with seed `s` is a function of `(s, i)` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticCorners {
    /// Number of images.
    pub len: usize,
    /// Side of the square images, in pixels.
    pub size: usize,
    /// Seed of the split.
    pub seed: u64,
}

impl SyntheticCorners {
    /// The class names, by index.
    pub const CLASSES: [&'static str; 2] = ["differ", "match"];

    /// The mark colours (RGB).
    pub const COLOURS: [[u8; 3]; 2] = [[220, 40, 40], [40, 90, 230]];

    /// The label and the two mark colours (top-right, bottom-left) of item `index`.
    pub fn marks(&self, index: usize) -> (usize, usize, usize) {
        let mut rng = self.rng(index);
        let label = index % 2;
        let colours = Self::COLOURS.len();
        let first = (rng.next_u64() % colours as u64) as usize;
        let second = if label == 1 {
            first
        } else {
            (first + 1 + (rng.next_u64() % (colours as u64 - 1)) as usize) % colours
        };
        (label, first, second)
    }

    fn rng(&self, index: usize) -> SplitMix64 {
        SplitMix64::new(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index as u64),
        )
    }
}

impl Dataset<LabeledImage> for SyntheticCorners {
    fn get(&self, index: usize) -> Option<LabeledImage> {
        if index >= self.len {
            return None;
        }
        let (label, first, second) = self.marks(index);
        let mut rng = self.rng(index);
        rng.next_u64();
        rng.next_u64();
        let size = self.size as u32;
        let mut image = RgbImage::new(size, size);
        for pixel in image.pixels_mut() {
            let grey = 128.0 + rng.uniform(-24.0, 24.0);
            pixel.0 = [grey as u8; 3];
        }
        let side = (size / 4).max(1);
        let jitter = (size / 16).max(1);
        // A mark of side `side` inside the 1-pixel border, pushed inwards by (dx, dy).
        let mut mark = |right: bool, bottom: bool, colour: [u8; 3], rng: &mut SplitMix64| {
            let dx = (rng.next_u64() % u64::from(jitter + 1)) as u32;
            let dy = (rng.next_u64() % u64::from(jitter + 1)) as u32;
            for y in 0..side {
                for x in 0..side {
                    let px = if right { size - 2 - dx - x } else { 1 + dx + x };
                    let py = if bottom {
                        size - 2 - dy - y
                    } else {
                        1 + dy + y
                    };
                    image.put_pixel(px, py, image::Rgb(colour));
                }
            }
        };
        mark(true, false, Self::COLOURS[first], &mut rng); // top-right
        mark(false, true, Self::COLOURS[second], &mut rng); // bottom-left
        Some(LabeledImage { image, label })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The file extensions an ImageFolder tree may hold (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// An ImageFolder split (`DIR/<class>/<image>`): the image paths with their class index, in
/// path order, decoded lazily by a [`MapperDataset`].
pub type ImageFolder = MapperDataset<InMemDataset<(PathBuf, usize)>, DecodeImage, (PathBuf, usize)>;

/// Decodes an image file to 8-bit RGB (an unreadable file is reported and yields a black
/// 1×1 image, so that one bad file does not stop a long training).
#[derive(Debug, Clone, Copy)]
pub struct DecodeImage;

impl Mapper<(PathBuf, usize), LabeledImage> for DecodeImage {
    fn map(&self, (path, label): &(PathBuf, usize)) -> LabeledImage {
        let image = match image::open(path) {
            Ok(image) => image.to_rgb8(),
            Err(e) => {
                log::error!("{}: {e}; using a black image", path.display());
                RgbImage::new(1, 1)
            }
        };
        LabeledImage {
            image,
            label: *label,
        }
    }
}

/// Reads `root/train` and `root/val` (one folder per class, the same classes in both).
/// Returns the class names (sorted, as torchvision's `ImageFolder` orders them) and the splits.
pub fn image_folders(root: &Path) -> Result<(Vec<String>, ImageFolder, ImageFolder), String> {
    let (classes, train) = read_split(&root.join("train"))?;
    let (val_classes, val) = read_split(&root.join("val"))?;
    if val_classes != classes {
        return Err(format!(
            "--data {}: train/ and val/ must hold the same class folders; train has {classes:?}, \
             val has {val_classes:?}",
            root.display()
        ));
    }
    let folder = |items| MapperDataset::new(InMemDataset::new(items), DecodeImage);
    Ok((classes, folder(train), folder(val)))
}

type Items = Vec<(PathBuf, usize)>;

fn read_split(dir: &Path) -> Result<(Vec<String>, Items), String> {
    let read = |d: &Path| {
        std::fs::read_dir(d)
            .map_err(|e| format!("--data: {}: {e}", d.display()))
            .map(|entries| {
                let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                paths.sort();
                paths
            })
    };
    let class_dirs: Vec<PathBuf> = read(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    let mut classes = Vec::new();
    let mut items = Vec::new();
    for (label, class_dir) in class_dirs.iter().enumerate() {
        classes.push(
            class_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        items.extend(
            read(class_dir)?
                .into_iter()
                .filter(|p| {
                    p.extension().is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str())
                    })
                })
                .map(|p| (p, label)),
        );
    }
    if classes.len() < 2 || items.is_empty() {
        return Err(format!(
            "--data: {} must hold at least two class folders with images ({}), found {} \
             folders and {} images",
            dir.display(),
            IMAGE_EXTENSIONS.join(", "),
            classes.len(),
            items.len()
        ));
    }
    Ok((classes, items))
}

/// How an image becomes a model input of side `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Used as it is (it must already be `size × size`): the synthetic task, where a crop or a
    /// flip would move the marks.
    Identity,
    /// Training: random-resized crop (scale 0.08–1, aspect 3/4–4/3, bicubic) and a horizontal
    /// flip with probability 1/2 (timm's `RandomResizedCropAndInterpolation` + flip).
    RandomResizedCropFlip,
    /// Evaluation: shorter side to `size / 0.875` (256 for 224), bicubic, centre crop `size`
    /// (`classify`'s transform).
    ResizeCenterCrop,
}

impl Transform {
    /// Applies the transform; `rng` draws the random crop and flip.
    pub fn apply(self, image: &RgbImage, size: u32, rng: &mut SplitMix64) -> RgbImage {
        match self {
            Transform::Identity => image.clone(),
            Transform::ResizeCenterCrop => crate::classify::resize_center_crop(image, size),
            Transform::RandomResizedCropFlip => {
                let (w, h) = image.dimensions();
                let area = f64::from(w) * f64::from(h);
                let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
                let mut crop = None;
                for _ in 0..10 {
                    let target = area * f64::from(rng.uniform(0.08, 1.0));
                    let aspect =
                        (log_lo + (log_hi - log_lo) * f64::from(rng.uniform(0.0, 1.0))).exp();
                    let cw = (target * aspect).sqrt().round() as u32;
                    let ch = (target / aspect).sqrt().round() as u32;
                    if (1..=w).contains(&cw) && (1..=h).contains(&ch) {
                        let x = (rng.next_u64() % u64::from(w - cw + 1)) as u32;
                        let y = (rng.next_u64() % u64::from(h - ch + 1)) as u32;
                        crop = Some((x, y, cw, ch));
                        break;
                    }
                }
                // timm's fallback: the whole image, clipped to the aspect range, centred.
                let (x, y, cw, ch) = crop.unwrap_or_else(|| {
                    let ratio = f64::from(w) / f64::from(h);
                    let (cw, ch) = if ratio < 3.0 / 4.0 {
                        (w, (f64::from(w) / (3.0 / 4.0)).round() as u32)
                    } else if ratio > 4.0 / 3.0 {
                        ((f64::from(h) * 4.0 / 3.0).round() as u32, h)
                    } else {
                        (w, h)
                    };
                    let (cw, ch) = (cw.min(w), ch.min(h));
                    ((w - cw) / 2, (h - ch) / 2, cw, ch)
                });
                let cropped = imageops::crop_imm(image, x, y, cw, ch).to_image();
                let resized = imageops::resize(&cropped, size, size, FilterType::CatmullRom);
                if rng.next_u64() & 1 == 1 {
                    imageops::flip_horizontal(&resized)
                } else {
                    resized
                }
            }
        }
    }
}

/// A batch: normalised images and their labels.
#[derive(Debug, Clone)]
pub struct ImageBatch<B: Backend> {
    /// `[batch, 3, size, size]`, ImageNet-normalised.
    pub images: Tensor<B, 4>,
    /// `[batch]` class indices.
    pub targets: Tensor<B, 1, Int>,
}

/// Turns [`LabeledImage`]s into an [`ImageBatch`] through a [`Transform`].
///
/// The random transforms draw from a generator seeded by `(seed, n)` for the `n`-th batch this
/// batcher (and its clones) made: reproducible with one data-loader worker.
#[derive(Debug, Clone)]
pub struct ImageBatcher {
    transform: Transform,
    size: u32,
    seed: u64,
    batches: Arc<AtomicU64>,
}

impl ImageBatcher {
    /// A batcher producing `size × size` inputs.
    pub fn new(transform: Transform, size: usize, seed: u64) -> Self {
        Self {
            transform,
            size: size as u32,
            seed,
            batches: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The normalised `[3, size, size]` values of one image, after the transform.
    pub fn pixels(&self, image: &RgbImage, rng: &mut SplitMix64) -> Vec<f32> {
        let image = self.transform.apply(image, self.size, rng);
        crate::classify::normalise(&image)
    }
}

impl<B: Backend> Batcher<B, LabeledImage, ImageBatch<B>> for ImageBatcher {
    fn batch(&self, items: Vec<LabeledImage>, device: &B::Device) -> ImageBatch<B> {
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        let mut rng = SplitMix64::new(self.seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let size = self.size as usize;
        let mut values = Vec::with_capacity(items.len() * 3 * size * size);
        let mut labels = Vec::with_capacity(items.len());
        for item in &items {
            let pixels = self.pixels(&item.image, &mut rng);
            assert_eq!(
                pixels.len(),
                3 * size * size,
                "an image of the batch is not {size}×{size} after the transform"
            );
            values.extend(pixels);
            labels.push(item.label as i64);
        }
        let batch = items.len();
        ImageBatch {
            images: Tensor::from_data(TensorData::new(values, [batch, 3, size, size]), device),
            targets: Tensor::from_data(TensorData::new(labels, [batch]), device),
        }
    }
}
