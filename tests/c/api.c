/* C test of the rest of include/vdisk.h: info accessors, the extent map, compare, snapshots,
 * check with repair, the streaming import from a file descriptor (file, pipe, archive,
 * cancellation, hostile input), and the containerDisk builder. Run by scripts/c-test.sh
 * under AddressSanitizer and UBSan with: a qemu-made 8 MiB qcow2 (0x5a at 0..64k, 0x33 at
 * 4M..6M), an output directory, and a tar holding disk.img. */
#define _POSIX_C_SOURCE 200809L
#include "vdisk.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);  \
            return 1;                                                              \
        }                                                                          \
    } while (0)

static int exists(const char *p) { return access(p, F_OK) == 0; }

struct map_state {
    int count;
    uint64_t next;
    uint64_t data_bytes;
    int ordered;
};
static int on_extent(void *user_data, const vdisk_extent *e) {
    struct map_state *m = user_data;
    if (e->start != m->next) m->ordered = 0;
    m->next = e->start + e->length;
    if (e->data) m->data_bytes += e->length;
    m->count++;
    return 0;
}
static int stop_at_first(void *user_data, const vdisk_extent *e) {
    (void)e;
    *(int *)user_data += 1;
    return 1;
}
static int cancel_import(void *user_data, uint64_t done, uint64_t total) {
    (void)done;
    (void)total;
    *(int *)user_data += 1;
    return 1;
}

/* Feed a file into a pipe from another thread. */
struct feed {
    const char *path;
    int fd;
};
static void *feeder(void *arg) {
    struct feed *f = arg;
    int in = open(f->path, O_RDONLY);
    char buf[65536];
    ssize_t n;
    while (in >= 0 && (n = read(in, buf, sizeof buf)) > 0) {
        if (write(f->fd, buf, (size_t)n) != n) break;
    }
    if (in >= 0) close(in);
    close(f->fd);
    return NULL;
}

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* Append two clusters to a 64 KiB-cluster, 16-bit-refcount qcow2 and give the second one a
 * refcount: one leaked cluster. */
static int make_leak(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0) return -1;
    unsigned char h[64], e[8];
    struct stat st;
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h || fstat(fd, &st) != 0) return -1;
    uint64_t cs = 1ull << be(h + 20, 4);
    uint64_t end = ((uint64_t)st.st_size + cs - 1) / cs;
    if (ftruncate(fd, (off_t)((end + 2) * cs)) != 0) return -1;
    if (pread(fd, e, 8, (off_t)be(h + 48, 8)) != 8) return -1;
    uint64_t block = be(e, 8);
    unsigned char rc[2] = {0, 1};
    if (block == 0 || pwrite(fd, rc, 2, (off_t)(block + 2 * (end + 1))) != 2) return -1;
    return close(fd);
}

int main(int argc, char **argv) {
    CHECK(argc == 4);
    const char *src = argv[1], *dir = argv[2], *tarball = argv[3];
    char a[4096], b[4096];
    vdisk_error *err = NULL;

    /* Info accessors. */
    vdisk_image *img = NULL;
    CHECK(vdisk_image_open(src, 1, &img, &err) == VDISK_STATUS_OK);
    CHECK(strcmp(vdisk_image_format_name(img), "qcow2") == 0);
    CHECK(vdisk_image_cluster_size(img) == 65536);
    CHECK(vdisk_image_is_dirty(img) == 0);
    CHECK(vdisk_image_snapshot_count(img) == 0);
    uint64_t actual = 0;
    CHECK(vdisk_image_actual_size(img, &actual, &err) == VDISK_STATUS_OK && actual > 0);
    char *backing = (char *)"unset";
    CHECK(vdisk_image_backing_file(img, &backing, &err) == VDISK_STATUS_OK && backing == NULL);
    char *json = NULL;
    CHECK(vdisk_image_info_json(img, &json, &err) == VDISK_STATUS_OK);
    CHECK(strstr(json, "\"virtual-size\": 8388608") != NULL);
    CHECK(strstr(json, "\"cluster-size\": 65536") != NULL);
    vdisk_string_free(json);
    vdisk_string_free(NULL);
    CHECK(vdisk_image_format_name(NULL) == NULL && vdisk_image_cluster_size(NULL) == 0);
    CHECK(vdisk_image_info_json(NULL, &json, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_image_info_json(img, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);

    /* Image locks: the open image (a reader) keeps writers off, as QEMU's locks do; a
       force-share open reads beside a writer's locks; unknown lock modes are refused. */
    CHECK(vdisk_resize(src, 16u << 20, 0, VDISK_PREALLOCATION_OFF, &err) == VDISK_STATUS_LOCKED);
    vdisk_error_free(err);
    err = NULL;
    vdisk_image *shared = NULL;
    CHECK(vdisk_image_open_locked(src, 1, VDISK_LOCK_MODE_FORCE_SHARE, &shared, &err) == VDISK_STATUS_OK);
    vdisk_image_free(shared);
    CHECK(vdisk_image_open_locked(src, 1, 7, &shared, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;

    /* The extent map: ordered, covering the disk, with exactly the written data. */
    struct map_state m = {0, 0, 0, 1};
    CHECK(vdisk_image_map(img, on_extent, &m, &err) == VDISK_STATUS_OK);
    CHECK(m.ordered && m.next == 8u << 20 && m.count >= 4);
    CHECK(m.data_bytes == (64u << 10) + (2u << 20));
    int calls = 0;
    CHECK(vdisk_image_map(img, stop_at_first, &calls, &err) == VDISK_STATUS_CANCELLED && calls == 1);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_image_map(img, NULL, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);

    /* Compare with a raw copy (identical) and with a blank disk (differs at 0). */
    snprintf(a, sizeof a, "%s/copy.raw", dir);
    CHECK(vdisk_convert(src, a, NULL, &err) == VDISK_STATUS_OK);
    snprintf(b, sizeof b, "%s/blank.qcow2", dir);
    CHECK(vdisk_create(b, VDISK_FORMAT_QCOW2, 8u << 20, NULL, NULL, &err) == VDISK_STATUS_OK);
    vdisk_image *copy = NULL, *blank = NULL;
    CHECK(vdisk_image_open(a, 1, &copy, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_image_open(b, 1, &blank, &err) == VDISK_STATUS_OK);
    int same = -1;
    uint64_t at = 99;
    CHECK(vdisk_compare(img, copy, 0, &same, &at, &err) == VDISK_STATUS_OK && same == 1);
    /* Strict (qemu-img compare -s) compares allocation too: the qcow2 and its raw copy
       differ there (as qemu-img says), an image and itself do not. */
    CHECK(vdisk_compare(img, copy, 1, &same, &at, &err) == VDISK_STATUS_OK && same == 0);
    CHECK(vdisk_compare(copy, copy, 1, &same, &at, &err) == VDISK_STATUS_OK && same == 1);
    CHECK(vdisk_compare(img, blank, 0, &same, &at, &err) == VDISK_STATUS_OK && same == 0 && at == 0);
    CHECK(vdisk_compare(img, NULL, 0, &same, &at, NULL) == VDISK_STATUS_NULL_PARAMETER);
    vdisk_image_free(copy);
    vdisk_image_free(blank);

    /* Snapshots: create, duplicate refused, apply, delete. */
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_CREATE, "s1", &err) == VDISK_STATUS_OK);
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_CREATE, "s1", &err) != VDISK_STATUS_OK);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_image_open(b, 1, &blank, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_image_snapshot_count(blank) == 1);
    vdisk_image_free(blank);
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_APPLY, "s1", &err) == VDISK_STATUS_OK);
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_APPLY, "nope", &err) == VDISK_STATUS_NOT_FOUND);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_DELETE, "s1", &err) == VDISK_STATUS_OK);
    CHECK(vdisk_snapshot(b, VDISK_SNAPSHOT_OP_DELETE, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);

    /* Check and repair a leaked cluster. */
    CHECK(make_leak(b) == 0);
    vdisk_check_report r;
    CHECK(vdisk_check(b, VDISK_REPAIR_NONE, &r, &err) == VDISK_STATUS_OK);
    CHECK(r.leaks == 1 && r.corruptions == 0 && r.exit_code == 3 && r.leaks_fixed == 0);
    CHECK(vdisk_check(b, VDISK_REPAIR_LEAKS, &r, &err) == VDISK_STATUS_OK);
    CHECK(r.leaks == 0 && r.leaks_fixed == 1 && r.exit_code == 0);

    /* Import from a file's descriptor, then from a pipe; both equal the source. */
    vdisk_import_report rep;
    memset(&rep, 0, sizeof rep);
    snprintf(a, sizeof a, "%s/imported.img", dir);
    int fd = open(src, O_RDONLY);
    CHECK(fd >= 0);
    CHECK(vdisk_import_fd(fd, VDISK_TARGET_FILE, a, NULL, &rep, &err) == VDISK_STATUS_OK);
    CHECK(fcntl(fd, F_GETFD) != -1); /* not closed */
    close(fd);
    CHECK(strcmp(rep.format, "qcow2") == 0 && rep.virtual_size == 8u << 20 && rep.disk_size == 8u << 20);
    CHECK(vdisk_image_open(a, 1, &copy, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_compare(img, copy, 0, &same, &at, &err) == VDISK_STATUS_OK && same == 1);
    /* Strict (qemu-img compare -s) compares allocation too: the qcow2 and its raw copy
       differ there (as qemu-img says), an image and itself do not. */
    CHECK(vdisk_compare(img, copy, 1, &same, &at, &err) == VDISK_STATUS_OK && same == 0);
    CHECK(vdisk_compare(copy, copy, 1, &same, &at, &err) == VDISK_STATUS_OK && same == 1);
    vdisk_image_free(copy);

    int p[2];
    CHECK(pipe(p) == 0);
    struct feed f = {src, p[1]};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, feeder, &f) == 0);
    vdisk_import_options *io = vdisk_import_options_new();
    CHECK(vdisk_import_options_set_requested_size(io, 64u << 20) == VDISK_STATUS_OK);
    CHECK(vdisk_import_options_set_overhead(io, 0.0) == VDISK_STATUS_OK);
    CHECK(vdisk_import_options_set_memory(io, 1u << 20, 1) == VDISK_STATUS_OK);
    CHECK(vdisk_import_options_set_threads(io, 0) == VDISK_STATUS_OK);
    snprintf(b, sizeof b, "%s/piped.img", dir);
    CHECK(vdisk_import_fd(p[0], VDISK_TARGET_FILE, b, io, &rep, &err) == VDISK_STATUS_OK);
    pthread_join(t, NULL);
    close(p[0]);
    /* Expanded to the usable space of the requested size (no overhead: all of it). */
    CHECK(rep.virtual_size == 8u << 20 && rep.disk_size == 64u << 20);
    CHECK(vdisk_image_open(b, 1, &copy, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_image_virtual_size(copy) == 64u << 20);
    CHECK(vdisk_compare(img, copy, 0, &same, &at, &err) == VDISK_STATUS_OK && same == 1);
    vdisk_image_free(copy);
    CHECK(vdisk_import_options_set_overhead(io, 1.5) == VDISK_STATUS_INVALID_ARGUMENT);

    /* Too small a volume: refused before writing, nothing left behind. */
    CHECK(vdisk_import_options_set_requested_size(io, 1u << 20) == VDISK_STATUS_OK);
    snprintf(b, sizeof b, "%s/small.img", dir);
    fd = open(src, O_RDONLY);
    CHECK(vdisk_import_fd(fd, VDISK_TARGET_FILE, b, io, NULL, &err) != VDISK_STATUS_OK);
    close(fd);
    CHECK(err != NULL && !exists(b));
    vdisk_error_free(err);
    err = NULL;

    /* Cancelled by the progress callback: nothing left behind. */
    int cancels = 0;
    vdisk_import_options_free(io);
    io = vdisk_import_options_new();
    CHECK(vdisk_import_options_set_progress(io, cancel_import, &cancels) == VDISK_STATUS_OK);
    snprintf(b, sizeof b, "%s/cancelled.img", dir);
    fd = open(src, O_RDONLY);
    CHECK(vdisk_import_fd(fd, VDISK_TARGET_FILE, b, io, NULL, NULL) == VDISK_STATUS_CANCELLED);
    close(fd);
    CHECK(cancels >= 1 && !exists(b));
    vdisk_import_options_free(io);

    /* Hostile: a qcow2 naming a backing file is refused; a bad descriptor too. */
    snprintf(a, sizeof a, "%s/overlay.qcow2", dir);
    snprintf(b, sizeof b, "backing_file=%s,backing_fmt=qcow2", src);
    CHECK(vdisk_create(a, VDISK_FORMAT_QCOW2, 8u << 20, b, NULL, &err) == VDISK_STATUS_OK);
    snprintf(b, sizeof b, "%s/from-overlay.img", dir);
    fd = open(a, O_RDONLY);
    CHECK(vdisk_import_fd(fd, VDISK_TARGET_FILE, b, NULL, NULL, &err) == VDISK_STATUS_DENIED);
    close(fd);
    CHECK(!exists(b));
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_import_fd(-1, VDISK_TARGET_FILE, b, NULL, NULL, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_import_fd(0, VDISK_TARGET_FILE, NULL, NULL, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);

    /* An archive unpacked into a directory. */
    snprintf(a, sizeof a, "%s/unpacked", dir);
    CHECK(mkdir(a, 0755) == 0);
    io = vdisk_import_options_new();
    CHECK(vdisk_import_options_set_content(io, VDISK_CONTENT_ARCHIVE) == VDISK_STATUS_OK);
    fd = open(tarball, O_RDONLY);
    CHECK(vdisk_import_fd(fd, VDISK_TARGET_DIRECTORY, a, io, NULL, &err) == VDISK_STATUS_OK);
    close(fd);
    vdisk_import_options_free(io);
    vdisk_import_options_free(NULL);
    snprintf(b, sizeof b, "%s/unpacked/disk.img", dir);
    CHECK(exists(b));

    vdisk_image_free(img);
    puts("c api test: 1 passed, 0 failed");
    /* qemu-img measure's numbers, rebase, commit and amend. The image is 8 MiB with data in
       its first 64 KiB and at 4-6 MiB (see c-test.sh); qemu-img gives these numbers for it. */
    vdisk_measure_report mr;
    CHECK(vdisk_measure(NULL, 1000, VDISK_FORMAT_QCOW2, NULL, &mr, &err) == VDISK_STATUS_OK);
    CHECK(mr.required == 327680 && mr.fully_allocated == 393216 && !mr.has_bitmaps);
    CHECK(vdisk_measure(NULL, 1000, VDISK_FORMAT_RAW, NULL, &mr, &err) == VDISK_STATUS_OK);
    CHECK(mr.required == 1024 && mr.fully_allocated == 1024);
    CHECK(vdisk_measure(src, 0, VDISK_FORMAT_QCOW2, "cluster_size=64k", &mr, &err) == VDISK_STATUS_OK);
    CHECK(mr.has_bitmaps && mr.bitmaps == 0 && mr.required < mr.fully_allocated);
    CHECK(vdisk_measure(src, 0, 9, NULL, &mr, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_measure(src, 0, VDISK_FORMAT_RAW, NULL, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    /* An overlay of a copy of the image, flattened by rebase onto nothing, committed, amended. */
    snprintf(a, sizeof a, "%s/base.qcow2", dir);
    vdisk_convert_options *qo = vdisk_convert_options_new();
    CHECK(vdisk_convert_options_set_format(qo, VDISK_FORMAT_QCOW2) == VDISK_STATUS_OK);
    CHECK(vdisk_convert(src, a, qo, &err) == VDISK_STATUS_OK);
    vdisk_convert_options_free(qo);
    snprintf(b, sizeof b, "%s/top.qcow2", dir);
    char opts[4200];
    snprintf(opts, sizeof opts, "backing_file=%s,backing_fmt=qcow2", a);
    CHECK(vdisk_create(b, VDISK_FORMAT_QCOW2, 8u << 20, opts, NULL, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_commit(b, NULL, 0, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_rebase(b, NULL, NULL, 0, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_amend(b, "compat=0.10", &err) == VDISK_STATUS_OK);
    CHECK(vdisk_amend(b, "cluster_size=4k", &err) == VDISK_STATUS_UNSUPPORTED_FEATURE);
    vdisk_error_free(err);
    err = NULL;
    vdisk_image *flat = NULL;
    CHECK(vdisk_image_open(b, 0, &flat, &err) == VDISK_STATUS_OK);
    char *bf = (char *)"unset";
    CHECK(vdisk_image_backing_file(flat, &bf, &err) == VDISK_STATUS_OK && bf == NULL);
    vdisk_image *orig = NULL;
    CHECK(vdisk_image_open(src, 0, &orig, &err) == VDISK_STATUS_OK);
    int same2 = -1;
    uint64_t at2 = 0;
    CHECK(vdisk_compare(orig, flat, 0, &same2, &at2, &err) == VDISK_STATUS_OK && same2 == 1);
    vdisk_image_free(orig);
    vdisk_image_free(flat);
    CHECK(vdisk_rebase(b, "x.qcow2", NULL, 0, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_commit(b, NULL, 0, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_snapshot(b, 3, "s", NULL) == VDISK_STATUS_INVALID_ARGUMENT);

    /* ISO images and cloud-init seeds. */
    char ud[4200], iso[4200], tree[4096], graft[4300];
    snprintf(tree, sizeof tree, "%s/isotree", dir);
    mkdir(tree, 0755);
    snprintf(ud, sizeof ud, "%s/user-data", tree);
    FILE *uf = fopen(ud, "w");
    CHECK(uf != NULL);
    fputs("#cloud-config\n", uf);
    fclose(uf);
    snprintf(iso, sizeof iso, "%s/tree.iso", dir);
    snprintf(graft, sizeof graft, "extra/copy=%s", ud);
    const char *sources[] = {tree, graft};
    CHECK(vdisk_iso_create(sources, 2, iso, "volid=CAPI,iso_level=2", &err) == VDISK_STATUS_OK);
    int fd2 = open(iso, O_RDONLY);
    unsigned char pvd[2048];
    CHECK(fd2 >= 0 && pread(fd2, pvd, sizeof pvd, 16 * 2048) == (ssize_t)sizeof pvd);
    close(fd2);
    CHECK(memcmp(pvd + 1, "CD001", 5) == 0 && memcmp(pvd + 40, "CAPI ", 5) == 0);
    vdisk_image *isoimg = NULL;
    CHECK(vdisk_image_open(iso, 1, &isoimg, &err) == VDISK_STATUS_OK);
    /* An ISO reads as a raw disk, as in qemu. */
    CHECK(strcmp(vdisk_image_format_name(isoimg), "raw") == 0);
    vdisk_image_free(isoimg);
    CHECK(vdisk_iso_create(sources, 2, iso, "bogus=1", &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_iso_create(NULL, 1, iso, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_iso_create(sources, 0, iso, NULL, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    snprintf(a, sizeof a, "%s/seed.iso", dir);
    CHECK(vdisk_cidata(ud, NULL, NULL, NULL, a, VDISK_FORMAT_RAW, &err) == VDISK_STATUS_OK);
    fd2 = open(a, O_RDONLY);
    CHECK(fd2 >= 0 && pread(fd2, pvd, sizeof pvd, 16 * 2048) == (ssize_t)sizeof pvd);
    close(fd2);
    CHECK(memcmp(pvd + 40, "cidata ", 7) == 0);
    snprintf(b, sizeof b, "%s/seed.qcow2", dir);
    CHECK(vdisk_cidata(ud, NULL, NULL, NULL, b, VDISK_FORMAT_QCOW2, &err) == VDISK_STATUS_OK);
    vdisk_image *seedq = NULL;
    CHECK(vdisk_image_open(b, 1, &seedq, &err) == VDISK_STATUS_OK);
    CHECK(strcmp(vdisk_image_format_name(seedq), "qcow2") == 0);
    vdisk_image_free(seedq);
    CHECK(vdisk_cidata(ud, NULL, NULL, NULL, b, 7, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_cidata(NULL, NULL, NULL, NULL, b, 0, NULL) == VDISK_STATUS_NULL_PARAMETER);
    snprintf(a, sizeof a, "%s/missing", dir);
    CHECK(vdisk_cidata(a, NULL, NULL, NULL, b, 0, &err) == VDISK_STATUS_NOT_FOUND);
    vdisk_error_free(err);
    err = NULL;
    puts("c api test: iso and cidata passed");
    /* A containerDisk of the image as an OCI archive: converted on the way, reproducible
       (another tag, same manifest); bad input refused, nothing left behind. */
    vdisk_containerdisk_options *co = vdisk_containerdisk_options_new();
    CHECK(vdisk_containerdisk_options_set_compression(co, VDISK_LAYER_COMPRESSION_ZSTD) == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_set_conversion(co, VDISK_DISK_CONVERSION_QCOW2_COMPRESSED) == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_set_architecture(co, "arm64") == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_set_disk_name(co, "fedora.qcow2") == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_add_label(co, "org.example.os", "fedora") == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_add_env(co, "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small") == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_set_source_date_epoch(co, 1700000000) == VDISK_STATUS_OK);
    CHECK(vdisk_containerdisk_options_set_compression(co, 7) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_containerdisk_options_set_conversion(NULL, 0) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_containerdisk_options_add_label(co, NULL, "x") == VDISK_STATUS_NULL_PARAMETER);
    vdisk_containerdisk_report cr1, cr2;
    snprintf(a, sizeof a, "oci-archive:%s/cd1.tar", dir);
    CHECK(vdisk_containerdisk_build(src, a, co, &cr1, &err) == VDISK_STATUS_OK);
    snprintf(a, sizeof a, "oci-archive:%s/cd2.tar:v1", dir);
    CHECK(vdisk_containerdisk_build(src, a, co, &cr2, &err) == VDISK_STATUS_OK);
    CHECK(strncmp(cr1.manifest_digest, "sha256:", 7) == 0 && strlen(cr1.manifest_digest) == 71);
    CHECK(strcmp(cr1.manifest_digest, cr2.manifest_digest) == 0);
    CHECK(strcmp(cr1.diff_id, cr2.diff_id) == 0 && strcmp(cr1.layer_digest, cr1.diff_id) != 0);
    CHECK(cr1.layer_size > 0 && cr1.layer_size < cr1.disk_size && cr1.blobs_uploaded == 0);
    snprintf(b, sizeof b, "%s/cd1.tar", dir);
    CHECK(exists(b));
    snprintf(a, sizeof a, "oci-archive:%s/missing.tar", dir);
    CHECK(vdisk_containerdisk_build("/nonexistent/disk.qcow2", a, NULL, NULL, &err) == VDISK_STATUS_NOT_FOUND);
    CHECK(vdisk_error_message(err, b, sizeof b) > 0 && strstr(b, "/nonexistent/disk.qcow2") != NULL);
    vdisk_error_free(err);
    err = NULL;
    snprintf(b, sizeof b, "%s/missing.tar", dir);
    CHECK(!exists(b));
    CHECK(vdisk_containerdisk_build(src, "tar:x", NULL, NULL, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_containerdisk_build(NULL, a, NULL, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    vdisk_containerdisk_options_free(co);
    vdisk_containerdisk_options_free(NULL);

    return 0;
}
