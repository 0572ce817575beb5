# Packs for hosts that have nothing installed (a lent machine, a bare server), shared by
# bench-hw-boot.sh and bench-bare-boots.sh. Source it; $root is the checkout.

# The first build of NAME under target/: the one `make install` ships (node), else
# release's, else debug's.
first_build() {
  local b
  for b in node release debug; do
    [[ -x $root/target/$b/$1 ]] && { echo "$root/target/$b/$1"; return 0; }
  done
  echo "no $1 build under $root/target (make install)" >&2
  return 1
}

# The guest image (`make image`) into DIR/image and a static busybox into DIR. The PVH
# kernel and the initramfs are gzipped to keep a carry small; unpack_into restores them.
pack_image() {
  mkdir -p "$1/image"
  cp "$root/target/image/manifest.json" "$root/target/image/vmlinuz" "$1/image/"
  gzip -6 -c "$root/target/image/vmlinux" > "$1/image/vmlinux.gz"
  gzip -6 -c "$root/target/image/initramfs.cpio" > "$1/image/initramfs.cpio.gz"
  cp /bin/busybox "$1/"
}

# A copy of pack SRC in DEST with its gzipped files unpacked.
unpack_into() {
  cp -r "$1/." "$2/"
  find "$2" -name '*.gz' -exec gunzip {} +
}
