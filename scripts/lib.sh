# Shared shell helpers for the scripts: a local registry and `bob proxy` on free ports.
# Source it; every process started here is stopped by `bob_cleanup` (install it as an EXIT trap).

BOB_PIDS=()

bob_cleanup() {
  for p in "${BOB_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${W:-}" ] && rm -rf "$W"
}

# wait_listen LOG PID: prints host:port once LOG says "listening on", fails if PID dies first.
wait_listen() {
  local log=$1 pid=$2 line
  for _ in $(seq 1 500); do
    line=$(grep -m1 -o 'listening on [^ "]*' "$log" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "${line#listening on }" | sed 's#^http://##'; return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "process $pid died:" >&2; cat "$log" >&2; return 1; }
    sleep 0.02
  done
  echo "timed out waiting for $log" >&2; return 1
}

# start_registry DIR [USER PASS]: a docker-registry on 127.0.0.1:<free port>; sets REG.
start_registry() {
  local dir=$1 auth=""
  mkdir -p "$dir"
  if [ $# -ge 3 ]; then
    htpasswd -Bbn "$2" "$3" > "$dir/htpasswd"
    auth="auth: {htpasswd: {realm: bob-demo, path: $dir/htpasswd}}"
  fi
  cat > "$dir/config.yml" <<YML
version: 0.1
log: {level: info, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}
http: {addr: "127.0.0.1:0", secret: bob-demo}
$auth
YML
  docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  BOB_PIDS+=($!)
  REG=$(wait_listen "$dir/registry.log" $!)
}

# start_proxy LOG VAR=VALUE...: `bob proxy` on 127.0.0.1:<free port>; sets PROXY and PROXY_PID.
start_proxy() {
  local log=$1; shift
  env BOB_PROXY_ADDR=127.0.0.1:0 "$@" "$BOB" proxy > "$log" 2>&1 &
  PROXY_PID=$!
  BOB_PIDS+=($PROXY_PID)
  PROXY=$(wait_listen "$log" $PROXY_PID)
}

# oci_busybox_layout DIR TAG: a one-layer OCI image layout with busybox-static as its shell.
oci_busybox_layout() {
  local out=$1 tag=$2 root; root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$out/blobs/sha256"
  cp /bin/busybox "$root/bin/"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$out/layer.tar" .
  local diffid; diffid=$(sha256sum "$out/layer.tar" | cut -d' ' -f1)
  gzip -n -9 "$out/layer.tar"
  local ld ls; ld=$(sha256sum "$out/layer.tar.gz" | cut -d' ' -f1); ls=$(stat -c%s "$out/layer.tar.gz")
  mv "$out/layer.tar.gz" "$out/blobs/sha256/$ld"
  # A history entry per layer, as Dockerfile-built images have (buildah 1.28 needs one to commit a
  # layer per step on top of it, and to match cached steps).
  jq -cn --arg d "sha256:$diffid" '{architecture:"amd64",os:"linux",config:{Env:["PATH=/bin"],Cmd:["/bin/sh"]},rootfs:{type:"layers",diff_ids:[$d]},history:[{created:"1970-01-01T00:00:00Z",created_by:"busybox-static"}]}' > "$out/c"
  local cd cs; cd=$(sha256sum "$out/c" | cut -d' ' -f1); cs=$(stat -c%s "$out/c"); mv "$out/c" "$out/blobs/sha256/$cd"
  jq -cn --arg c "sha256:$cd" --argjson cs "$cs" --arg l "sha256:$ld" --argjson ls "$ls" \
    '{schemaVersion:2,mediaType:"application/vnd.oci.image.manifest.v1+json",config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$c,size:$cs},layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip",digest:$l,size:$ls}]}' > "$out/m"
  local md ms; md=$(sha256sum "$out/m" | cut -d' ' -f1); ms=$(stat -c%s "$out/m"); mv "$out/m" "$out/blobs/sha256/$md"
  jq -cn --arg m "sha256:$md" --argjson ms "$ms" --arg t "$tag" \
    '{schemaVersion:2,manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$m,size:$ms,annotations:{"org.opencontainers.image.ref.name":$t}}]}' > "$out/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
  rm -rf "$root"
  echo "sha256:$md"
}

# random_layout DIR LAYERS LAYER_MIB: an OCI layout (tag latest) of LAYERS random, incompressible
# uncompressed layers of LAYER_MIB each; skopeo pushes them unchanged.
random_layout() {
  local L=$1 n=$2 mib=$3 layers="[]" d diffs cd_ cs md ms
  mkdir -p "$L/blobs/sha256"
  for _ in $(seq 1 "$n"); do
    head -c "${mib}M" /dev/urandom > "$L/l"; d=$(sha256sum "$L/l" | cut -d' ' -f1); mv "$L/l" "$L/blobs/sha256/$d"
    layers=$(jq -c --arg d "sha256:$d" --argjson s $((mib << 20)) '. + [{mediaType:"application/vnd.oci.image.layer.v1.tar",digest:$d,size:$s}]' <<<"$layers")
  done
  diffs=$(jq -c '[.[].digest]' <<<"$layers")
  jq -cn --argjson d "$diffs" '{architecture:"amd64",os:"linux",rootfs:{type:"layers",diff_ids:$d}}' > "$L/c"
  cd_=$(sha256sum "$L/c" | cut -d' ' -f1); cs=$(stat -c%s "$L/c"); mv "$L/c" "$L/blobs/sha256/$cd_"
  jq -cn --arg c "sha256:$cd_" --argjson cs "$cs" --argjson l "$layers" \
    '{schemaVersion:2,mediaType:"application/vnd.oci.image.manifest.v1+json",config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$c,size:$cs},layers:$l}' > "$L/m"
  md=$(sha256sum "$L/m" | cut -d' ' -f1); ms=$(stat -c%s "$L/m"); mv "$L/m" "$L/blobs/sha256/$md"
  jq -cn --arg m "sha256:$md" --argjson ms "$ms" '{schemaVersion:2,manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$m,size:$ms,annotations:{"org.opencontainers.image.ref.name":"latest"}}]}' > "$L/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$L/oci-layout"
}

# Timing helpers for the benchmarks.
now() { date +%s.%N; }
span() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
# skopeo remembers where blobs live and would mount instead of sending: forget between runs.
forget() { rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb; }
