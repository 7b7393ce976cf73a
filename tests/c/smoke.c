/* C smoke test of include/vdisk.h: open, size, read, errors, NULL handling, sizing.
 * Built with -std=c11 -Wall -Wextra -Werror under AddressSanitizer and UBSan by
 * scripts/c-test.sh, which passes a qcow2 image whose first byte is 0x5a. */
#define _POSIX_C_SOURCE 200809L
#include "vdisk.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHECK(c)                                                        \
    do {                                                                \
        if (!(c)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            return 1;                                                   \
        }                                                               \
    } while (0)

static int progress_calls;
static int count_progress(void *user_data, uint64_t done, uint64_t total) {
    (void)user_data;
    (void)done;
    (void)total;
    progress_calls++;
    return 0;
}
static int stop_now(void *user_data, uint64_t done, uint64_t total) {
    (void)done;
    (void)total;
    *(int *)user_data += 1;
    return 1;
}
static void *cancel_soon(void *c) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
    vdisk_cancel_request((vdisk_cancel *)c);
    return NULL;
}
static int exists(const char *p) { return access(p, F_OK) == 0; }

int main(int argc, char **argv) {
    CHECK(argc >= 3);
    const char *dir = argv[2];
    char out[4096], out2[4096], bad[4096], emsg[512];
    CHECK(strlen(vdisk_version()) > 0);
    char version[64];
    snprintf(version, sizeof version, "%d.%d.%d", VDISK_VERSION_MAJOR, VDISK_VERSION_MINOR,
             VDISK_VERSION_PATCH);
    CHECK(strcmp(version, vdisk_version()) == 0);

    vdisk_image *img = NULL;
    vdisk_error *err = NULL;
    CHECK(vdisk_image_open(argv[1], 1, &img, &err) == VDISK_STATUS_OK);
    CHECK(err == NULL && img != NULL);
    CHECK(vdisk_image_virtual_size(img) == 8u << 20);
    unsigned char buf[4096];
    CHECK(vdisk_image_read(img, buf, sizeof buf, 0, &err) == VDISK_STATUS_OK);
    CHECK(buf[0] == 0x5a && buf[4095] == 0x5a);

    /* Reading past the end fails with a message. */
    CHECK(vdisk_image_read(img, buf, sizeof buf, 8u << 20, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(err != NULL);
    size_t need = vdisk_error_message(err, NULL, 0);
    char *msg = malloc(need);
    CHECK(msg != NULL);
    CHECK(vdisk_error_message(err, msg, need) == need);
    CHECK(strlen(msg) + 1 == need);
    char small[4];
    vdisk_error_message(err, small, sizeof small);
    CHECK(small[3] == '\0');
    free(msg);
    vdisk_error_free(err);
    err = NULL;
    vdisk_image_free(img);

    /* Missing file, NULL arguments, NULL frees. */
    CHECK(vdisk_image_open("/nonexistent.qcow2", 0, &img, &err) == VDISK_STATUS_NOT_FOUND);
    CHECK(vdisk_error_status(err) == VDISK_STATUS_NOT_FOUND);
    vdisk_error_free(err);
    CHECK(vdisk_image_open(NULL, 0, &img, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_image_open(argv[1], 0, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_image_read(NULL, buf, 1, 0, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_error_status(NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_error_message(NULL, NULL, 0) == 0);
    vdisk_image_free(NULL);
    vdisk_error_free(NULL);
    CHECK(strcmp(vdisk_status_str(VDISK_STATUS_OK), "ok") == 0);

    /* Convert to raw with progress, then to compressed qcow2; check the result. */
    vdisk_convert_options *co = vdisk_convert_options_new();
    CHECK(co != NULL);
    CHECK(vdisk_convert_options_set_progress(co, count_progress, NULL) == VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_untrusted(co, 1) == VDISK_STATUS_OK);
    snprintf(out, sizeof out, "%s/out.raw", dir);
    CHECK(vdisk_convert(argv[1], out, co, &err) == VDISK_STATUS_OK);
    CHECK(progress_calls >= 1 && exists(out));
    vdisk_convert_options_free(co);
    co = vdisk_convert_options_new();
    CHECK(vdisk_convert_options_set_format(co, VDISK_FORMAT_QCOW2) == VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_create_options(co, "cluster_size=4k,compression_type=zstd", &err) ==
          VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_compress(co, 1) == VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_min_sparse(co, 4096) == VDISK_STATUS_OK);
    snprintf(out2, sizeof out2, "%s/out.qcow2", dir);
    CHECK(vdisk_convert(out, out2, co, &err) == VDISK_STATUS_OK);
    vdisk_check_report rep;
    memset(&rep, 0xff, sizeof rep);
    CHECK(vdisk_check(out2, VDISK_REPAIR_NONE, &rep, &err) == VDISK_STATUS_OK);
    CHECK(rep.corruptions == 0 && rep.leaks == 0 && rep.exit_code == 0 && rep.compressed_clusters > 0);
    CHECK(vdisk_check(out, VDISK_REPAIR_NONE, &rep, &err) == VDISK_STATUS_UNSUPPORTED_FEATURE);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_convert_options_set_create_options(co, "no_such_option=1", &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_convert_options_set_create_options(co, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_convert_options_set_format(NULL, VDISK_FORMAT_RAW) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_convert(NULL, out, co, NULL) == VDISK_STATUS_NULL_PARAMETER);
    CHECK(vdisk_check(out2, VDISK_REPAIR_NONE, NULL, NULL) == VDISK_STATUS_NULL_PARAMETER);
    /* Enum arguments are uint32_t and checked: a value no enum declares (as ctypes or cgo can
       pass) is refused, never taken as some mode. */
    CHECK(vdisk_convert_options_set_format(co, 2) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_convert_options_set_format(co, 0xffffffffu) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_convert_options_set_preallocation(co, 4) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_check(out2, 3, &rep, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(err != NULL && vdisk_error_message(err, emsg, sizeof emsg) > 0 && strstr(emsg, "vdisk_repair") != NULL);
    vdisk_error_free(err);
    err = NULL;
    snprintf(bad, sizeof bad, "%s/never.qcow2", dir);
    CHECK(vdisk_create(bad, 7, 1u << 20, NULL, NULL, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(!exists(bad));
    CHECK(vdisk_resize(out2, 1u << 30, 0, 99, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(strcmp(vdisk_status_str(12345), "unknown status") == 0);
    vdisk_import_options *io = vdisk_import_options_new();
    CHECK(vdisk_import_options_set_content(io, 3) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(vdisk_import_fd(0, 3, bad, io, NULL, NULL) == VDISK_STATUS_INVALID_ARGUMENT);
    CHECK(!exists(bad));
    vdisk_import_options_free(io);
    vdisk_convert_options_free(co);
    vdisk_convert_options_free(NULL);

    /* Cancelled from the callback, by a token set before, and from another thread. */
    snprintf(out, sizeof out, "%s/cancelled.raw", dir);
    int stops = 0;
    co = vdisk_convert_options_new();
    CHECK(vdisk_convert_options_set_progress(co, stop_now, &stops) == VDISK_STATUS_OK);
    CHECK(vdisk_convert(argv[1], out, co, NULL) == VDISK_STATUS_CANCELLED);
    CHECK(stops >= 1 && !exists(out));
    vdisk_convert_options_free(co);
    co = vdisk_convert_options_new();
    vdisk_cancel *c = vdisk_cancel_new();
    vdisk_cancel_request(c);
    CHECK(vdisk_convert_options_set_cancel(co, c) == VDISK_STATUS_OK);
    vdisk_cancel_free(c); /* the options keep their own reference */
    CHECK(vdisk_convert(argv[1], out, co, NULL) == VDISK_STATUS_CANCELLED);
    CHECK(!exists(out));
    vdisk_convert_options_free(co);
    co = vdisk_convert_options_new();
    c = vdisk_cancel_new();
    CHECK(vdisk_convert_options_set_cancel(co, c) == VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_format(co, VDISK_FORMAT_QCOW2) == VDISK_STATUS_OK);
    CHECK(vdisk_convert_options_set_compress(co, 1) == VDISK_STATUS_OK);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, cancel_soon, c) == 0);
    vdisk_status st = vdisk_convert(argv[1], out, co, NULL);
    pthread_join(t, NULL);
    CHECK(st == VDISK_STATUS_OK || (st == VDISK_STATUS_CANCELLED && !exists(out)));
    vdisk_cancel_free(c);
    vdisk_convert_options_free(co);
    vdisk_cancel_request(NULL);
    vdisk_cancel_free(NULL);

    /* Create and resize. */
    snprintf(out, sizeof out, "%s/new.qcow2", dir);
    vdisk_preallocation applied = VDISK_PREALLOCATION_FULL;
    CHECK(vdisk_create(out, VDISK_FORMAT_QCOW2, 1u << 20, "cluster_size=512", &applied, &err) == VDISK_STATUS_OK);
    CHECK(applied == VDISK_PREALLOCATION_OFF);
    CHECK(vdisk_resize(out, 4u << 20, 0, VDISK_PREALLOCATION_OFF, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_resize(out, 1u << 20, 0, VDISK_PREALLOCATION_OFF, &err) == VDISK_STATUS_INVALID_ARGUMENT);
    vdisk_error_free(err);
    err = NULL;
    CHECK(vdisk_image_open(out, 1, &img, &err) == VDISK_STATUS_OK);
    CHECK(vdisk_image_virtual_size(img) == 4u << 20);
    vdisk_image_free(img);
    CHECK(vdisk_check(out, VDISK_REPAIR_NONE, &rep, NULL) == VDISK_STATUS_OK && rep.corruptions == 0 &&
          rep.leaks == 0);

    /* CDI's worked numbers. */
    CHECK(vdisk_required_space(0.06, 10ull << 30) == 11381663335ull);
    CHECK(vdisk_usable_space(0.06, 11381663335ull) == 10737418240ull);
    puts("c smoke test: 1 passed, 0 failed");
    return 0;
}
