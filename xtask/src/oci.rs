//! OCI image archives without a container engine: one layer of files, a config, a manifest per
//! platform and, for several platforms, an image index, written as an OCI image layout in a tar
//! file that `ctr images import`, `docker load`, `podman load`, `kind load image-archive` and
//! `skopeo copy oci-archive:` take.
//!
//! Reproducible: the same files give the same bytes (tar headers without times or owners, gzip
//! without a time stamp, JSON with sorted keys), so the same binary gives the same digest.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use anyhow::{Context as _, Result, bail, ensure};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// What one platform's image holds and how it starts.
pub struct ImageSpec<'a> {
    /// GOARCH: `amd64`, `arm64`.
    pub architecture: &'a str,
    /// (file on this machine, absolute path in the image): root-owned executables (0755).
    pub files: Vec<(PathBuf, String)>,
    /// A world-writable `/tmp` (1777), as distroless and Alpine have.
    pub tmp: bool,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `uid:gid`; empty: root.
    pub user: String,
    pub labels: BTreeMap<String, String>,
}

/// Blobs by digest, and the manifests written so far.
#[derive(Default)]
pub struct Layout {
    blobs: BTreeMap<String, Vec<u8>>,
    manifests: Vec<Descriptor>,
}

impl Layout {
    /// Adds one platform's image (one layer) and returns its manifest's descriptor.
    pub fn add_image(&mut self, spec: &ImageSpec) -> Result<Descriptor> {
        let layer = layer(&spec.files, spec.tmp)?;
        let diff_id = sha256(&layer);
        let compressed = gzip(&layer)?;
        let layer = self.add_blob(MediaType::ImageLayerGzip, compressed)?;
        let platform = PlatformBuilder::default()
            .architecture(Arch::from(spec.architecture))
            .os(Os::Linux)
            .build()?;
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::from(spec.architecture))
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .entrypoint(spec.entrypoint.clone())
                    .cmd(spec.cmd.clone())
                    .user(spec.user.clone())
                    .env(vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_owned()])
                    .labels(
                        spec.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<HashMap<_, _>>(),
                    )
                    .build()?,
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![format!("sha256:{diff_id}")])
                    .build()?,
            )
            .build()?;
        let config = self.add_blob(MediaType::ImageConfig, canonical_json(&config)?)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(config)
            .layers(vec![layer])
            .build()?;
        let mut descriptor = self.add_blob(MediaType::ImageManifest, canonical_json(&manifest)?)?;
        descriptor.set_platform(Some(platform));
        self.manifests.push(descriptor.clone());
        Ok(descriptor)
    }

    fn add_blob(&mut self, media_type: MediaType, bytes: Vec<u8>) -> Result<Descriptor> {
        let digest: Digest = Sha256Digest::from_str(&sha256(&bytes))?.into();
        let descriptor = DescriptorBuilder::default()
            .media_type(media_type)
            .digest(digest)
            .size(bytes.len() as u64)
            .build()?;
        self.blobs.insert(sha256(&bytes), bytes);
        Ok(descriptor)
    }

    /// Writes the layout as a tar archive at `path`, its images named `name` (`repo:tag`).
    /// One image: `index.json` names its manifest, and a `manifest.json` serves Docker releases
    /// older than 25 too. Several: `index.json` names an image index of them all.
    pub fn write_archive(mut self, path: &Path, name: &str) -> Result<()> {
        let tag = name
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map(|(_, tag)| tag)
            .with_context(|| format!("image name {name:?} has no tag"))?;
        let annotations = HashMap::from([
            ("io.containerd.image.name".to_owned(), name.to_owned()),
            (
                "org.opencontainers.image.ref.name".to_owned(),
                tag.to_owned(),
            ),
        ]);
        let mut docker_manifest = None;
        let mut top = match self.manifests.as_slice() {
            [] => bail!("no image to write"),
            [one] => {
                docker_manifest = Some(self.docker_manifest(one, name)?);
                one.clone()
            }
            many => {
                let index = ImageIndexBuilder::default()
                    .schema_version(2u32)
                    .media_type(MediaType::ImageIndex)
                    .manifests(many.to_vec())
                    .build()?;
                self.add_blob(MediaType::ImageIndex, canonical_json(&index)?)?
            }
        };
        top.set_annotations(Some(annotations));
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![top])
            .build()?;

        let mut files: Vec<(String, Vec<u8>)> = vec![
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), canonical_json(&index)?),
        ];
        files.extend(docker_manifest.map(|m| ("manifest.json".to_owned(), m)));
        files.extend(
            std::mem::take(&mut self.blobs)
                .into_iter()
                .map(|(digest, bytes)| (format!("blobs/sha256/{digest}"), bytes)),
        );
        let mut archive = tar::Builder::new(Vec::new());
        for dir in ["blobs/", "blobs/sha256/"] {
            append(&mut archive, dir, tar::EntryType::Directory, 0o755, &[])?;
        }
        for (file, bytes) in &files {
            append(&mut archive, file, tar::EntryType::Regular, 0o644, bytes)?;
        }
        let bytes = archive.into_inner()?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        // Renamed into place: a reader never sees half an archive.
        let partial = path.with_extension(format!("partial.{}", std::process::id()));
        fs::write(&partial, bytes).with_context(|| format!("write {}", partial.display()))?;
        fs::rename(&partial, path).with_context(|| format!("write {}", path.display()))
    }

    /// `docker save`'s `manifest.json` for one image.
    fn docker_manifest(&self, manifest: &Descriptor, name: &str) -> Result<Vec<u8>> {
        let manifest: ImageManifest =
            serde_json::from_slice(&self.blobs[manifest.digest().digest()])?;
        let blob = |d: &Descriptor| format!("blobs/sha256/{}", d.digest().digest());
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct DockerManifest {
            config: String,
            repo_tags: Vec<String>,
            layers: Vec<String>,
        }
        canonical_json(&[DockerManifest {
            config: blob(manifest.config()),
            repo_tags: vec![name.to_owned()],
            layers: manifest.layers().iter().map(blob).collect(),
        }])
    }
}

/// What an archive holds, read back by [`read_archive`].
pub struct Archive {
    /// The image name (`io.containerd.image.name`).
    pub name: String,
    /// Per platform (`linux/amd64`).
    pub images: BTreeMap<String, Image>,
}

pub struct Image {
    /// The manifest's digest (`sha256:…`).
    pub digest: String,
    pub config: ImageConfiguration,
    /// The paths in its layers (directories end in `/`).
    pub files: Vec<String>,
}

/// Reads an archive written by [`Layout::write_archive`] and checks every blob's digest and
/// size against its descriptor.
pub fn read_archive(path: &Path) -> Result<Archive> {
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(
        fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
    );
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        files.insert(name, bytes);
    }
    let blob = |descriptor: &Descriptor| -> Result<&Vec<u8>> {
        let digest = descriptor.digest().digest();
        let bytes = files
            .get(&format!("blobs/sha256/{digest}"))
            .with_context(|| format!("{}: blob {digest} missing", path.display()))?;
        ensure!(
            sha256(bytes) == digest && bytes.len() as u64 == descriptor.size(),
            "{}: blob {digest} does not match its descriptor",
            path.display()
        );
        Ok(bytes)
    };
    let index: ImageIndex = serde_json::from_slice(
        files
            .get("index.json")
            .with_context(|| format!("{}: no index.json", path.display()))?,
    )?;
    let [top] = index.manifests().as_slice() else {
        bail!("{}: index.json names more than one image", path.display());
    };
    let name = top
        .annotations()
        .as_ref()
        .and_then(|a| a.get("io.containerd.image.name"))
        .with_context(|| format!("{}: the image has no name", path.display()))?
        .clone();
    let manifests = if *top.media_type() == MediaType::ImageIndex {
        let nested: ImageIndex = serde_json::from_slice(blob(top)?)?;
        nested.manifests().clone()
    } else {
        vec![top.clone()]
    };
    let mut images = BTreeMap::new();
    for descriptor in &manifests {
        let manifest: ImageManifest = serde_json::from_slice(blob(descriptor)?)?;
        let config = serde_json::from_slice(blob(manifest.config())?)?;
        let mut paths = Vec::new();
        for layer in manifest.layers() {
            let mut layer = tar::Archive::new(flate2::read::GzDecoder::new(&blob(layer)?[..]));
            for entry in layer.entries()? {
                paths.push(entry?.path()?.to_string_lossy().into_owned());
            }
        }
        let platform = descriptor
            .platform()
            .as_ref()
            .with_context(|| format!("{}: a manifest without a platform", path.display()))?;
        images.insert(
            format!("{}/{}", platform.os(), platform.architecture()),
            Image {
                digest: descriptor.digest().to_string(),
                config,
                files: paths,
            },
        );
    }
    Ok(Archive { name, images })
}

/// An uncompressed tar of `files` with their parent directories, and `/tmp` if asked for.
fn layer(files: &[(PathBuf, String)], tmp: bool) -> Result<Vec<u8>> {
    let mut entries: BTreeMap<String, (tar::EntryType, u32, Vec<u8>)> = BTreeMap::new();
    if tmp {
        entries.insert("tmp/".into(), (tar::EntryType::Directory, 0o1777, vec![]));
    }
    for (source, target) in files {
        let relative = target
            .strip_prefix('/')
            .with_context(|| format!("{target:?} is not an absolute path"))?;
        let mut dir = Path::new(relative).parent();
        while let Some(parent) = dir.filter(|d| !d.as_os_str().is_empty()) {
            entries.insert(
                format!("{}/", parent.display()),
                (tar::EntryType::Directory, 0o755, vec![]),
            );
            dir = parent.parent();
        }
        let bytes = fs::read(source).with_context(|| format!("read {}", source.display()))?;
        entries.insert(relative.into(), (tar::EntryType::Regular, 0o755, bytes));
    }
    let mut layer = tar::Builder::new(Vec::new());
    for (path, (kind, mode, bytes)) in &entries {
        append(&mut layer, path, *kind, *mode, bytes)?;
    }
    Ok(layer.into_inner()?)
}

/// One root-owned entry without a time stamp.
fn append(
    archive: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(bytes.len() as u64);
    archive
        .append_data(&mut header, path, bytes)
        .with_context(|| format!("add {path} to the archive"))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    // No file name, time stamp 0: the same bytes every time.
    let mut encoder = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// JSON with every object's keys sorted (the OCI types keep maps in `HashMap`s).
fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>> {
    let mut value = serde_json::to_value(value)?;
    value.sort_all_objects();
    Ok(serde_json::to_vec(&value)?)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(architecture: &'a str, binary: &Path) -> ImageSpec<'a> {
        ImageSpec {
            architecture,
            files: vec![(binary.to_owned(), "/usr/local/bin/tool".into())],
            tmp: true,
            entrypoint: vec!["/usr/local/bin/tool".into()],
            cmd: vec!["serve".into()],
            user: "65532:65532".into(),
            labels: BTreeMap::from([
                ("a".into(), "1".into()),
                ("b".into(), "2".into()),
                ("c".into(), "3".into()),
            ]),
        }
    }

    fn write(dir: &Path, file: &str, platforms: &[&str], binary: &Path) -> PathBuf {
        let mut layout = Layout::default();
        for arch in platforms {
            layout.add_image(&spec(arch, binary)).unwrap();
        }
        let path = dir.join(file);
        layout
            .write_archive(&path, "example.org/a/tool:1.2.3")
            .unwrap();
        path
    }

    #[test]
    fn the_same_files_give_the_same_archive_and_another_file_another_digest() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("tool");
        fs::write(&binary, b"\x7fELF one").unwrap();
        let first = fs::read(write(dir.path(), "1.tar", &["amd64"], &binary)).unwrap();
        let second = fs::read(write(dir.path(), "2.tar", &["amd64"], &binary)).unwrap();
        assert!(first == second, "two writes of the same image differ");
        let digest = |path: &Path| {
            read_archive(path).unwrap().images["linux/amd64"]
                .digest
                .clone()
        };
        let before = digest(&dir.path().join("1.tar"));
        fs::write(&binary, b"\x7fELF two").unwrap();
        assert_ne!(
            before,
            digest(&write(dir.path(), "3.tar", &["amd64"], &binary))
        );
    }

    #[test]
    fn an_archive_names_its_image_and_every_platform_and_its_blobs_match() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("tool");
        fs::write(&binary, b"\x7fELF").unwrap();
        let path = write(dir.path(), "multi.tar", &["amd64", "arm64"], &binary);
        let archive = read_archive(&path).unwrap();
        assert_eq!(archive.name, "example.org/a/tool:1.2.3");
        assert_eq!(
            archive.images.keys().collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64"]
        );
        let arm64 = &archive.images["linux/arm64"];
        assert_eq!(arm64.config.architecture().to_string(), "arm64");
        assert_eq!(
            arm64.files,
            [
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/tool"
            ]
        );
        // The single-platform archive serves `docker load` through manifest.json too.
        let single = write(dir.path(), "single.tar", &["arm64"], &binary);
        let mut archive = tar::Archive::new(fs::File::open(&single).unwrap());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"manifest.json".to_owned()), "{names:?}");
    }

    #[test]
    fn a_damaged_blob_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("tool");
        fs::write(&binary, b"\x7fELF").unwrap();
        let path = write(dir.path(), "a.tar", &["amd64"], &binary);
        let mut bytes = fs::read(&path).unwrap();
        // The last blob's content (tar pads each entry to 512 bytes; the archive ends with two
        // zero blocks): flip a byte inside the file data of the layer or a JSON blob.
        let at = bytes
            .windows(7)
            .position(|w| w == b"\"serve\"")
            .expect("the config blob holds the command");
        bytes[at + 1] = b'S';
        fs::write(&path, bytes).unwrap();
        let error = read_archive(&path)
            .err()
            .expect("a damaged archive")
            .to_string();
        assert!(error.contains("does not match"), "{error}");
    }
}
