/* C smoke test of include/vdisk.h: open, size, read, errors, NULL handling, sizing.
 * Built with -std=c11 -Wall -Wextra -Werror under AddressSanitizer and UBSan by
 * scripts/c-test.sh, which passes a qcow2 image whose first byte is 0x5a. */
#include "vdisk.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(c)                                                        \
    do {                                                                \
        if (!(c)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            return 1;                                                   \
        }                                                               \
    } while (0)

int main(int argc, char **argv) {
    CHECK(argc == 2);
    CHECK(strlen(vdisk_version()) > 0);

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

    /* CDI's worked numbers. */
    CHECK(vdisk_required_space(0.06, 10ull << 30) == 11381663335ull);
    CHECK(vdisk_usable_space(0.06, 11381663335ull) == 10737418240ull);
    puts("c smoke test: 1 passed, 0 failed");
    return 0;
}
