% SPM12 reference numbers for parametric empirical Bayes (PEB), Bayesian model reduction
% over the group parameters and leave-one-out prediction, on the cohort written by
% peb_cohort.py. Run from the folder holding cohort.mat:
%   octave --no-gui --eval "addpath('/work/spm12'); addpath('<repo>/scripts/spm/octave_standins'); source('<repo>/scripts/spm/peb_reference.m')"
% Writes peb_reference.mat next to cohort.mat.
graphics_toolkit('gnuplot'); set(0, 'defaultfigurevisible', 'off');
spm('defaults', 'fmri'); spm_get_defaults('cmdline', true);
rand('state', 0); randn('state', 0);
load('cohort.mat');
n  = 4;
tmpl = struct('A', zeros(n), 'transit', zeros(n, 1), 'decay', 0, 'epsilon', 0, ...
              'a', zeros(2, 1), 'b', zeros(2, 1), 'c', zeros(n, 1));
Ns = size(Ep, 1);
GCM = cell(Ns, 1);
for i = 1:Ns
    DCM = struct();
    DCM.M.pE = spm_unvec(pE(:), tmpl);
    DCM.M.pC = pC;
    DCM.Ep   = spm_unvec(Ep(i, :)', tmpl);
    DCM.Cp   = squeeze(Cp(i, :, :));
    DCM.F    = F(i);
    DCM.name = sprintf('sub-%02d', i);
    GCM{i}   = DCM;
end
M = struct('X', X);
M.Xnames = {'mean', 'covariate'};
tic; [PEB, RCM] = spm_dcm_peb(GCM, M, {'A'}); t_peb = toc;
out.peb_Ep = full(PEB.Ep); out.peb_Cp = full(PEB.Cp); out.peb_Ce = full(PEB.Ce);
out.peb_Eh = full(PEB.Eh); out.peb_Ch = full(PEB.Ch); out.peb_F = full(PEB.F);
out.peb_pE = full(PEB.M.pE); out.peb_pC = full(PEB.M.pC); out.peb_Pind = PEB.Pind;
for i = 1:Ns
    out.eb_Ep(i, :) = spm_vec(RCM{i}.Ep)';
    out.eb_Cp(i, :, :) = full(RCM{i}.Cp);
    out.eb_F(i) = full(RCM{i}.F);
end
% a second precision model: one component per parameter
M2 = M; M2.Q = 'all';
PEB2 = spm_dcm_peb(GCM, M2, {'A'});
out.peb_all_Ep = full(PEB2.Ep); out.peb_all_Cp = full(PEB2.Cp); out.peb_all_Eh = full(PEB2.Eh);
out.peb_all_F = full(PEB2.F);
% greedy Bayesian model reduction over all group parameters (spm_dcm_bmr_all)
tic; [BMA, BMR] = spm_dcm_peb_bmc(PEB); t_bmr = toc;
out.bmr_Ep = full(spm_vec(BMA.Ep)); out.bmr_Cp = full(BMA.Cp); out.bmr_Pp = full(spm_vec(BMA.Pp));
out.bmr_F = full(BMR.F); out.bmr_P = full(BMR.P); out.bmr_K = double(BMR.K); out.bmr_k = BMR.k;
% an explicit model space: every on/off combination of three connections
Np = numel(PEB.Pind);
K = ones(8, Np); K(:, [2 8 12]) = spm_perm_mtx(3);
tic; BMC = spm_dcm_peb_bmc(PEB, K); t_bmc = toc;
out.bmc_K = BMC.K; out.bmc_F = full(BMC.F); out.bmc_P = full(BMC.P);
out.bmc_Pw = full(BMC.Pw); out.bmc_Px = full(BMC.Px);
out.bmc_Ep = full(spm_vec(BMC.Ep)); out.bmc_Cp = full(spm_vec(BMC.Cp));
% leave-one-out prediction of the covariate
tic; [qE, qC, Q] = spm_dcm_loo(GCM, M, {'A'}); t_loo = toc;
out.loo_qE = full(qE); out.loo_qC = full(qC); out.loo_Q = full(Q);
% SPM12 with one line changed: the complexity of the group parameters centred on their
% prior mean, Fb = (b - bE)'*bP*(b - bE), instead of on zero. SPM's Fisher scoring accepts
% or rejects its steps by this F, and with a non-zero prior mean (the one-subject models of
% spm_dcm_ppd) the unpatched F stops it after 5 iterations, far from the optimum.
mkdir('patched');
src = fileread(which('spm_dcm_peb'));
fixed = strrep(src, 'Fb    = b''*bP*b;', 'Fb    = (b - bE)''*bP*(b - bE);');
assert(~strcmp(src, fixed));
fid = fopen(fullfile('patched', 'spm_dcm_peb.m'), 'w'); fprintf(fid, '%s', fixed); fclose(fid);
addpath(fullfile(pwd, 'patched')); rehash;
PEBc = spm_dcm_peb(GCM, M, {'A'});
out.centred_peb_F = full(PEBc.F); out.centred_peb_Ep = full(PEBc.Ep);
[qE, qC, Q] = spm_dcm_loo(GCM, M, {'A'});
out.centred_loo_qE = full(qE); out.centred_loo_qC = full(qC); out.centred_loo_Q = full(Q);
rmpath(fullfile(pwd, 'patched'));
out.seconds = [t_peb t_bmr t_bmc t_loo];
out.spm_version = spm('version');
save('-v7', 'peb_reference.mat', '-struct', 'out');
disp(out.seconds);
