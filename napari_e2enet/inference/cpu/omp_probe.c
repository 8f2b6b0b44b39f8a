/* Compiled by build.compiler_has_openmp: does `cc -fopenmp` find omp.h and link the runtime? */
#include <omp.h>

int e2e_omp_probe(void) { return omp_get_max_threads(); }
