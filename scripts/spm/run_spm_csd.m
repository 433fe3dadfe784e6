function run_spm_csd(ts_file, TR, out_dir, maxit)
% RUN_SPM_CSD  SPM12's own spectral DCM inversion of one ROI time series, for the engine's tests.
%
%   run_spm_csd(ts_file, TR, out_dir) reads a T x n text time series (whitespace separated),
%   inverts a fully connected n-region model with spm_dcm_fmri_csd (SPM12 defaults) and
%   writes into out_dir (maxit, default SPM's 128, caps the iterations: a timing run of a
%   large model can stop after a few):
%     meta.json       F, iterations, accepted/rejected steps, scale, Eh, seconds, versions
%     spm_Ep_A.txt    posterior means of A (n x n, rows = targets), %.17g
%     spm_Vp_A.txt    posterior variances of A (n x n)
%     Ep_vec.txt      every posterior mean in spm_vec order
%     spm_basis.txt   V = spm_svd(pC, 0), the reduced parameter space spm_nlsi_GN works in
%     csd_data.txt, Hz.txt  SPM's data features at full precision (write_spm_csd.m)
%     spm_log.txt     SPM's iteration log
%
%   Needs SPM12 on the path (scripts/spm/run_all.sh adds it). Two Octave 7 quirks are worked
%   around: SPM's sparse prior means are passed as full arrays (DCM.M.pE), so the prior
%   covariance (DCM.M.pC) is built here with spm_dcm_fmri_csd's own steps (priors, then the
%   projection of the A prior onto 8 data modes above 8 regions); and the final save uses
%   Octave's own binary format. Within the degenerate eigenspaces of pC, spm_svd's basis is whatever
%   LAPACK returns: it changes with OpenBLAS's thread count, so run_all.sh fixes
%   OPENBLAS_NUM_THREADS and this script records the basis it produces for the same matrix.
if nargin < 4, maxit = 128; end
y = load(ts_file);
[T, n] = size(y);
DCM = struct();
DCM.a = ones(n); DCM.b = zeros(n, n, 0); DCM.c = zeros(n, 0); DCM.d = zeros(n, n, 0);
DCM.n = n; DCM.v = T;
DCM.Y.y = y; DCM.Y.dt = TR;
DCM.U.u = zeros(T, 1); DCM.U.dt = TR; DCM.U.name = {'null'};
DCM.options = struct('nonlinear', 0, 'two_state', 0, 'stochastic', 0, 'centre', 0, ...
    'induced', 1, 'nograph', 1, 'maxnodes', 8, 'order', 8, 'maxit', maxit, 'analysis', 'CSD');
DCM.name = fullfile(out_dir, 'DCM_spm.mat');

% the prior exactly as spm_dcm_fmri_csd builds it (detrend, scale, project above 8 regions)
yy = spm_detrend(y);
vY = spm_vec(yy);
yy = spm_unvec(vY / std(vY) / 4, yy);
[pE, pC] = spm_dcm_fmri_priors(DCM.a, zeros(n, n, 0), zeros(n, 0), zeros(n, n, 0), DCM.options);
if n > DCM.options.maxnodes
    V = spm_svd(spm_detrend(yy)');
    V = V(:, 1:DCM.options.maxnodes);
    j = 1:(n * n);
    V = kron(V * V', V * V');
    pC(j, j) = V * pC(j, j) * V';
end
names = fieldnames(pE);
for k = 1:numel(names)
    pE.(names{k}) = full(pE.(names{k}));
end
DCM.M.pE = pE;
DCM.M.pC = pC;
basis = full(spm_svd(pC, 0));

spm_get_defaults('mat.format', '-binary');
logfile = fullfile(out_dir, 'spm_log.txt');
if exist(logfile, 'file'), delete(logfile); end
diary(logfile); diary on;
tic;
DCM = spm_dcm_fmri_csd(DCM);
seconds = toc;
diary off;

txt = fileread(logfile);
steps = regexp(txt, 'EM:\((\+|-)\)', 'tokens');
steps = [steps{:}];
meta = struct();
meta.n = n; meta.TR = TR; meta.scans = T;
meta.F = full(DCM.F);
meta.iterations = numel(steps);
meta.accepted = sum(strcmp(steps, '+'));
meta.rejected = sum(strcmp(steps, '-'));
meta.scale = full(DCM.Y.scale);
meta.Eh = full(DCM.Ce(:))';
meta.seconds = seconds;
meta.octave = OCTAVE_VERSION;
meta.spm = spm('Ver');
meta.openblas_threads = getenv('OPENBLAS_NUM_THREADS');
fid = fopen(fullfile(out_dir, 'meta.json'), 'w');
fprintf(fid, '%s\n', jsonencode(meta));
fclose(fid);
Cp = full(DCM.Cp);
vp = diag(Cp);
dlmwrite(fullfile(out_dir, 'spm_Ep_A.txt'), full(DCM.Ep.A), 'delimiter', ' ', 'precision', '%.17g');
dlmwrite(fullfile(out_dir, 'spm_Vp_A.txt'), reshape(vp(1:n * n), n, n), 'delimiter', ' ', 'precision', '%.17g');
dlmwrite(fullfile(out_dir, 'Ep_vec.txt'), full(spm_vec(DCM.Ep)), 'precision', '%.17g');
dlmwrite(fullfile(out_dir, 'spm_basis.txt'), basis, 'delimiter', ' ', 'precision', '%.17g');
write_spm_csd(DCM.Y.csd, DCM.Y.Hz, out_dir);
end
